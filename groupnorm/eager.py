"""Eager fast path: the same kernels and autograd formulas without the custom-op dispatch.

A ``torch.library.custom_op`` call costs ~100 us of Python dispatch per call on top of the
kernel, which dominates small shapes. In plain eager mode nothing needs the op node, so
``group_norm`` calls the op's implementation through a lean ``autograd.Function``. Whenever
something might trace, transform or re-dispatch the call (torch.compile, export, fake or
functional tensors, dispatch or function modes, functorch transforms, autocast), the custom
op runs instead, so those tools see one ``groupnorm::forward`` node as before.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad

from . import ops, transforms

Tensor = torch.Tensor

# Tests flip this to compare the two paths; users never need to.
ENABLED = True


_Parameter = torch.nn.Parameter


def _plain(t) -> bool:
    """None or a tensor whose memory the kernels may read: an exact torch.Tensor, or an
    nn.Parameter (every module's weight; its __torch_function__ is disabled)."""
    return t is None or type(t) is torch.Tensor or type(t) is _Parameter


_is_compiling = torch.compiler.is_compiling
_function_mode_on = torch._C._is_torch_function_mode_enabled
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_functorch_active = torch._C._are_functorch_transforms_active
_tracing = torch._C._get_tracing_state
_functorch_level = torch._C._functorch.maybe_current_level
# One C call for every device type (is_autocast_enabled(device) raises for "meta").
_any_autocast = torch._C._is_any_autocast_enabled


def usable(x: Tensor, weight=None, bias=None, scale=None, shift=None) -> bool:
    """True when nothing can observe the difference between the op and a direct call.
    (Cheapest checks first: this runs on every eager call.)"""
    if _is_compiling():   # first: dynamo traces this and cannot trace the mode queries below
        return False
    if not ENABLED or type(x) is not torch.Tensor or not (_plain(weight) and _plain(bias)):
        return False
    if not (scale is None and shift is None) and not (_plain(scale) and _plain(shift)):
        return False
    if _function_mode_on() or _dispatch_modes() or _functorch_wrapped(x) or _tracing():
        return False
    return not _any_autocast()


def transformed(x: Tensor) -> bool:
    """torch.func transforms or forward-mode AD are active: the call must go through
    ``GroupNormFunction`` (its setup_context, jvp and vmap rules), whatever needs a gradient.
    Under torch.compile, tracing and dispatch modes the custom op serves instead."""
    if _is_compiling() or _tracing() or _dispatch_modes() or _function_mode_on():
        return False
    return _functorch_active() or forward_ad_on()


def forward_ad_on() -> bool:
    """A ``torch.autograd.forward_ad.dual_level`` is open (functorch's jvp counts as a
    transform, asked separately)."""
    return _forward_ad._current_level >= 0


class GroupNormFunction(torch.autograd.Function):
    """groupnorm::forward and its registered backward, minus the dispatcher; with the
    forward-AD and vmap rules of ``transforms``, so torch.func and forward_ad run it too.

    It returns (y, mean, rstd) (statistics non-differentiable): functorch wants the
    outputs handed to ``setup_context`` rather than a ctx inside ``forward``."""

    @staticmethod
    def forward(x, weight, bias, scale, shift, num_groups, eps, activation):
        return ops.forward_impl(x, weight, bias, scale, shift, num_groups, eps, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ops.save_for_backward(ctx, inputs, mean, rstd)
        ctx.save_for_forward(*inputs[:5], mean, rstd)

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        if _functorch_level() is not None:
            return transforms.functorch_backward(ctx, dy) + (None, None, None)
        return ops.input_grads(ctx, dy, ops.backward_grads) + (None, None, None)

    @staticmethod
    def jvp(ctx, tx, tweight, tbias, tscale, tshift, *_):
        return transforms.functorch_tangent(ctx, (tx, tweight, tbias, tscale, tshift)), None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, scale, shift, num_groups, eps, activation):
        return transforms.batched_call(GroupNormFunction.apply, info.batch_size, in_dims, x, weight, bias,
                                       scale, shift, num_groups, eps, activation)


def _needs_grad(x, weight, bias, scale, shift) -> bool:
    return (x.requires_grad or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad) or (scale is not None and scale.requires_grad)
            or (shift is not None and shift.requires_grad))


def group_norm(x, weight, bias, scale, shift, num_groups: int, eps: float, activation: str) -> Tensor:
    if transformed(x):
        return GroupNormFunction.apply(x, weight, bias, scale, shift, num_groups, eps, activation)[0]
    if torch.is_grad_enabled() and _needs_grad(x, weight, bias, scale, shift):
        return GroupNormFunction.apply(x, weight, bias, scale, shift, num_groups, eps, activation)[0]
    return ops.output_impl(x, weight, bias, scale, shift, num_groups, eps, activation)
