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


def _plain(t) -> bool:
    return t is None or type(t) is torch.Tensor


def usable(x: Tensor, *others) -> bool:
    """True when nothing can observe the difference between the op and a direct call."""
    if not ENABLED or type(x) is not torch.Tensor or not all(_plain(t) for t in others):
        return False
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return False
    if torch.utils._python_dispatch._get_current_dispatch_mode() is not None:
        return False
    return not torch.is_autocast_enabled(x.device.type)


class GroupNormFunction(torch.autograd.Function):
    """groupnorm::forward and its registered backward, minus the dispatcher."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, num_groups, eps, activation):
        y, mean, rstd = ops.forward_impl(x, weight, bias, scale, shift, num_groups, eps, activation)
        ops.save_for_backward(ctx, (x, weight, bias, scale, shift, num_groups, eps, activation), mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        return ops.input_grads(ctx, dy, ops.backward_impl) + (None, None, None)


def group_norm(x, weight, bias, scale, shift, num_groups: int, eps: float, activation: str) -> Tensor:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, scale, shift)):
        return GroupNormFunction.apply(x, weight, bias, scale, shift, num_groups, eps, activation)
    return ops.forward_impl(x, weight, bias, scale, shift, num_groups, eps, activation)[0]
