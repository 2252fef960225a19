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

from . import ops

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


def usable(x: Tensor, weight=None, bias=None, scale=None, shift=None) -> bool:
    """True when nothing can observe the difference between the op and a direct call.
    (Cheapest checks first: this runs on every eager call.)"""
    if _is_compiling():   # first: dynamo traces this and cannot trace the mode queries below
        return False
    if not ENABLED or type(x) is not torch.Tensor or not (_plain(weight) and _plain(bias)):
        return False
    if not (scale is None and shift is None) and not (_plain(scale) and _plain(shift)):
        return False
    if _function_mode_on() or _dispatch_modes() or _functorch_wrapped(x):
        return False
    return not torch.is_autocast_enabled("cpu" if x.is_cpu else x.device.type)


class GroupNormFunction(torch.autograd.Function):
    """groupnorm::forward and its registered backward, minus the dispatcher."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, num_groups, eps, activation):
        y, mean, rstd = ops.forward_impl(x, weight, bias, scale, shift, num_groups, eps, activation)
        ops.save_for_backward(ctx, (x, weight, bias, scale, shift, num_groups, eps, activation), mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        return ops.input_grads(ctx, dy, ops.backward_grads) + (None, None, None)


def _needs_grad(x, weight, bias, scale, shift) -> bool:
    return (x.requires_grad or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad) or (scale is not None and scale.requires_grad)
            or (shift is not None and shift.requires_grad))


def group_norm(x, weight, bias, scale, shift, num_groups: int, eps: float, activation: str) -> Tensor:
    if torch.is_grad_enabled() and _needs_grad(x, weight, bias, scale, shift):
        return GroupNormFunction.apply(x, weight, bias, scale, shift, num_groups, eps, activation)
    return ops.output_impl(x, weight, bias, scale, shift, num_groups, eps, activation)
