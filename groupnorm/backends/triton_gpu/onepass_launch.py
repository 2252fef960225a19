"""Launchers for the one-pass kernels; ``launch.forward`` / ``launch.backward_grads`` call in
for groups above the fused size and take today's split path when these return None.

MODE picks the variant: "auto" runs the barrier kernel (PHASE 0) in a cooperative launch on
CUDA and returns None elsewhere; "pair" runs the barrier-free pair (PHASE 1 then 2) on any
device (tests, the interpreter); "off" always returns None.
"""
from __future__ import annotations

import functools

import torch
import triton.language as tl

from . import onepass_plan, plan
from .epilogue_jit import ACTIVATION_CODES
from .onepass_kernels import onepass_forward_kernel
from .onepass_bwd_kernels import onepass_backward_kernel, param_grads_kernel

MODE = "auto"
# Plans whose cooperative launch failed (grid larger than what is resident): not retried.
_too_large: set = set()
# Plans whose cooperative launch succeeded: the only ones tried inside a CUDA-graph capture
# (a refused launch there could invalidate the capture; graphs are captured after warm-up).
_proven: set = set()
# (device index, stream) -> zeroed int32 barrier words, grown on demand.
_barriers: dict = {}


@functools.lru_cache(maxsize=None)
def _device_facts(index: int):
    props = torch.cuda.get_device_properties(index)
    # (SMs, L2 bytes, cooperative launches: every CUDA GPU from sm_60 on)
    return props.multi_processor_count, int(getattr(props, "L2_cache_size", 50 << 20)), props.major >= 6


def _facts(device: torch.device):
    if device.type == "cuda":
        return _device_facts(device.index if device.index is not None else torch.cuda.current_device())
    return plan.CPU_NUM_SMS, onepass_plan.CPU_L2_BYTES, False


def _phases(device: torch.device):
    """(0,) for the barrier kernel, (1, 2) for the pair, () for none."""
    if MODE == "pair":
        return (1, 2)
    if MODE == "auto" and device.type == "cuda" and _facts(device)[2]:
        return (0,)
    return ()


def _barrier_words(device: torch.device, rows: int):
    """Zeroed int32 words, one per row. Outside a CUDA-graph capture: kept per stream and
    reused by every launch on it (they reset themselves; two streams never share words).
    Inside a capture: fresh words whose zeroing is captured with the kernel (cached words
    allocated there would belong to the graph's pool and start unzeroed outside it)."""
    if torch.cuda.is_current_stream_capturing():
        return torch.zeros(max(rows, 1), dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device)
    key = (device.index, stream.cuda_stream)
    words = _barriers.get(key)
    if words is None or words.numel() < rows:
        words = torch.zeros(max(rows, 1024), dtype=torch.int32, device=device)
        _barriers[key] = words
    return words


def scratch(shape, dtype, device):
    """Internal partials, fully written before they are read (tests fill them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def launch_cooperative(kernel, grid, args, kwargs):
    """The PHASE 0 launch: all programs resident or a launch error, never a deadlock."""
    return kernel[grid](*args, launch_cooperative_grid=True, **kwargs)


def _is_too_large(err: Exception) -> bool:
    return "cooperative" in str(err).lower()


def _acc(dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _plans(x, lay, backward: bool, ladder: bool):
    """Plans to try in order: RESIDENT_PER_SM programs per SM, then fewer (a cooperative
    launch refused for the compiled kernel's occupancy is retried one step down)."""
    sms, l2, _ = _facts(x.device)
    top = max(1, onepass_plan.RESIDENT_PER_SM)
    seen = set()
    for resident in (range(top, 0, -1) if ladder else (top,)):
        p = onepass_plan.onepass_plan(lay.n, lay.c, lay.hw, lay.g, lay.channels_last, x.element_size(),
                                      sms, l2, backward, resident)
        if p is None:
            return
        if p not in seen:
            seen.add(p)
            yield p


def _strides(lay):
    return lay.stride_n, lay.stride_c, lay.stride_hw


def _run(kernel, x, p, phases, args, kwargs):
    """Launch the phases; False when the cooperative launch is refused (caller falls back)."""
    key = (id(kernel), x.device, x.dtype, p, repr(sorted(kwargs.items())))
    grid = (p.grid,)
    for phase in phases:
        kw = dict(kwargs, PHASE=phase)
        if phase != 0:
            kernel[grid](*args, **kw)
            continue
        if key in _too_large or (key not in _proven and _capturing(x)):
            return False
        try:
            launch_cooperative(kernel, grid, args, kw)
        except RuntimeError as err:
            if not _is_too_large(err):
                raise
            _too_large.add(key)
            return False
        _proven.add(key)
    return True


def _capturing(x) -> bool:
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_FLAG_NAMES = ("HAS_WEIGHT", "HAS_BIAS", "HAS_SCALE", "HAS_SHIFT")


def _named(flags) -> dict:
    """launch._params' (weight, bias, scale, shift) presence flags as the kernels' constexprs."""
    return dict(zip(_FLAG_NAMES, flags))


def forward(x, lay, mean, rstd, ptrs, flags, eps: float, activation: str):
    """(y, mean, rstd) in one pass over x, or None (take the split path); ``mean`` and
    ``rstd`` are the caller's (N, G) outputs."""
    flags = _named(flags)
    from . import launch  # its allocators (tests swap them for NaN-filled ones)

    phases = _phases(x.device)
    if not phases:
        return None
    acc, acc_tl = _acc(x.dtype)
    outs = None
    for p in _plans(x, lay, False, 0 in phases):
        if outs is None:
            outs = (launch.empty_like(x), mean, rstd)
        bar = _barrier_words(x.device, p.rows) if 0 in phases else x
        parts = scratch((3, lay.rows, p.split), acc, x.device)
        args = (x, outs[0], *ptrs, outs[1], outs[2], parts, bar,
                lay.c, lay.hw, lay.g, lay.g // p.span_g, *_strides(lay), p.rows, p.split, p.waves,
                lay.rows * p.split, eps)
        if _run(onepass_forward_kernel, x, p, phases, args, _constexprs(p, lay, flags, activation, acc_tl)):
            return outs
    return None


def _constexprs(p, lay, flags, activation: str, acc_tl):
    return dict(CPG=lay.cpg, SPAN_G=p.span_g, K=p.k, WIDE=p.wide, **flags,
                ACTIVATION=ACTIVATION_CODES[activation], ACC=acc_tl, BLOCK_C=p.block_c,
                BLOCK_HW=p.block_hw, BLOCK_G=p.block_g, MERGE_S=p.merge_s, num_warps=p.num_warps)


def backward(dy, x, lay, mean, rstd, ptrs, flags, params, activation: str):
    """(dx, dweight, dbias, dscale, dshift) with x and dy read once, or None (split path).

    ``params`` are (weight, bias, scale, shift), None where absent."""
    flags = _named(flags)
    from . import launch

    phases = _phases(x.device)
    if not phases:
        return None
    acc, acc_tl = _acc(x.dtype)
    dx = None
    for p in _plans(x, lay, True, 0 in phases):
        dx = launch.empty_like(x) if dx is None else dx
        bar = _barrier_words(x.device, p.rows) if 0 in phases else x
        chan = scratch((2, lay.n, p.split, lay.c), acc, x.device)
        grp = scratch((2, lay.rows, p.split), acc, x.device)
        args = (dy, x, dx, mean, rstd, *ptrs, chan, grp, bar,
                lay.c, lay.hw, lay.g, lay.g // p.span_g, *_strides(lay), p.rows, p.split, p.waves,
                lay.n * p.split * lay.c, lay.rows * p.split, lay.group_size)
        if _run(onepass_backward_kernel, x, p, phases, args, _constexprs(p, lay, flags, activation, acc_tl)):
            return (dx, *_param_grads(x, lay, p, chan, ptrs, flags, params, acc_tl))
    return None


def _param_grads(x, lay, p, chan, ptrs, flags, params, acc_tl):
    """dweight, dbias, dscale, dshift (None where absent) from the per-channel partials."""
    from . import launch

    grads = [None if t is None else launch.empty(t.shape, t.dtype, x.device) for t in params]
    if any(t is not None for t in grads):
        outs = [x if t is None else t for t in grads]
        block_c = min(128, plan.next_power_of_2(lay.c))
        block_s = min(64, plan.next_power_of_2(p.split))
        param_grads_kernel[(plan.cdiv(lay.c, block_c),)](
            chan[0], chan[1], ptrs[0], ptrs[1], ptrs[2], *outs, lay.n, lay.c, p.split,
            **flags, ACC=acc_tl, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4)
    return grads
