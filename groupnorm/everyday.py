"""The everyday eager call, decided with each tensor question asked once.

Most calls in a model are the same: a plain CPU or CUDA tensor, an int ``num_groups`` that
divides C, weight and bias ``(C,)`` (tensors or ``nn.Parameter``) or None, no fused
extras, nothing tracing or transforming the call. ``output`` recognises that call and
runs it; anything else returns None and takes the general path in ``functional``, which
checks every argument and raises torch's errors.

Why a separate path: right after a large kernel the interpreter's code and data are out
of the caches, and every tensor attribute costs 2-4 us instead of 0.1-0.2 (measured
2026-11-27 with ``benchmarks/glue_cost.py``, removed after eb1f750). The general path asks the same questions several times on
its way down (validation, layout, eager checks, op layer, registry, launcher), ~30-50 us
per call. Here shape, dtype, layout and element count are read once and handed to the
backend's optional ``forward_known`` (see ``backends.numba_cpu.launch`` and
``backends.triton_gpu.known``).

``nn.Parameter`` weights (every module's) are read directly, here as on the general
eager path: a Parameter's memory is a plain tensor's (its ``__torch_function__`` is
disabled). Until 2026-11-27 (af7931d) they went through the custom-op dispatcher, ~25 us
more per call.
"""
from __future__ import annotations

import torch
from torch.overrides import has_torch_function_variadic

from . import eager, ops, validation
from .backends import registry
from .epilogue import ACTIVATIONS

Tensor = torch.Tensor

_FLOAT = validation.FLOAT_SET
_CHANNELS_LAST = validation.CHANNELS_LAST_FORMATS
_param_ok = validation.plain_param_ok
_ACTIVATION = {name: name for name in ACTIVATIONS}
_ACTIVATION[None] = "none"

_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)
_is_grad_enabled = torch.is_grad_enabled
_has_storage = torch._C._has_storage
_tracing = torch._C._get_tracing_state   # torch.jit.trace: the op must appear in the graph


# torch.compiler.is_compiling, not the flag it returns: dynamo folds the call to True
# while tracing, but would guard on a read of the flag and recompile on every call.
_compiling = torch.compiler.is_compiling
USABLE = _functorch_active is not None and _any_autocast is not None


def output(x, num_groups, weight, bias, eps, activation):
    """y of ``group_norm(x, num_groups, weight, bias, eps, activation=activation)`` for
    the everyday CPU or CUDA call, or None when the call needs the general path (anything
    unusual, including every error case: the general path raises it)."""
    if _compiling():   # first: dynamo traces this function and stops at the checks below
        return None
    if not USABLE or type(x) is not Tensor or type(num_groups) is not int or num_groups <= 0:
        return None
    if type(eps) is not float:   # ints, NumPy scalars, 0-d tensors and wrong types: the general path
        return None
    if has_torch_function_variadic(x, weight, bias) or not eager.ENABLED:
        return None
    shape = x.shape
    dtype = x.dtype
    dims = len(shape)
    is_cpu = x.is_cpu
    if dims < 2 or shape[1] % num_groups or dtype not in _FLOAT or not (is_cpu or x.is_cuda):
        return None
    numel = x.numel()
    if numel == num_groups or numel == 0:
        return None
    channels = shape[1]
    if not (_param_ok(weight, dtype, channels, x, is_cpu) and _param_ok(bias, dtype, channels, x, is_cpu)):
        return None
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        return None
    act = _ACTIVATION.get(activation) if activation is None or type(activation) is str else None
    if act is None:
        return None
    if x.is_contiguous():
        channels_last = False
    elif dims in _CHANNELS_LAST and x.is_contiguous(memory_format=_CHANNELS_LAST[dims]):
        channels_last = True
    else:
        return None
    if _dispatch_modes() or _functorch_active() or _any_autocast() or _tracing() or eager.forward_ad_on():
        return None
    eps = float(eps)
    backend = registry.cpu_backend() if is_cpu else registry.backend_for("cuda")
    if _is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                               or (bias is not None and bias.requires_grad)):
        if getattr(backend, "backward_known", None) is None:
            return eager.GroupNormFunction.apply(x, weight, bias, None, None, num_groups, eps, act)[0]
        return KnownFunction.apply(x, weight, bias, (backend, shape, dtype, numel, channels_last, num_groups,
                                                     eps, act))
    known = getattr(backend, "forward_known", None)
    if known is not None:
        return known(x, shape, dtype, numel, channels_last, weight, bias, num_groups, eps, act)
    return ops.output_impl(x, weight, bias, None, None, num_groups, eps, act)


class KnownFunction(torch.autograd.Function):
    """The everyday call under autograd: the facts read in ``output`` travel to the
    backward on ctx, with the statistics as the backend left them (never made tensors),
    so the backward asks x nothing again either. Only x, weight and bias are saved
    tensors (autograd then still catches their in-place modification)."""

    @staticmethod
    def forward(ctx, x, weight, bias, facts):
        backend, shape, dtype, numel, channels_last, num_groups, eps, act = facts
        y, stats, stats_at = backend.forward_known_stats(x, shape, dtype, numel, channels_last, weight, bias,
                                                         num_groups, eps, act)
        ctx.save_for_backward(x, weight, bias)
        ctx.facts, ctx.stats, ctx.stats_at = facts, stats, stats_at
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        backend, shape, dtype, numel, channels_last, num_groups, eps, act = ctx.facts
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if _is_grad_enabled() or not _has_storage(dy):   # create_graph=True or a batched dy
            return _differentiable_backward(ctx, dy, x, weight, bias, need_x, need_w, need_b) + (None,)
        return backend.backward_known(dy, x, ctx.stats, ctx.stats_at, weight, bias, shape, dtype, numel,
                                      channels_last, num_groups, act, need_x, need_w, need_b) + (None,)


def _differentiable_backward(ctx, dy, x, weight, bias, need_x, need_w, need_b):
    """ops' double-backward path (the reference composition), for KnownFunction's ctx."""
    ctx.num_groups, ctx.eps, ctx.activation = ctx.facts[5], ctx.facts[6], ctx.facts[7]
    needs = (need_x, need_w, need_b, False, False)
    return ops._differentiable_backward(ctx, dy, (x, weight, bias, None, None), needs)[:3]
