"""Launchers: read the layout, allocate outputs, pick a plan, launch. No host syncs.

Every output goes through ``empty`` / ``empty_like`` below (tests swap them for NaN-filled
allocations, so an element a kernel forgets to write shows up).
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
import triton
import triton.language as tl

from . import onepass_launch, plan
from .apply_kernels import apply_kernel
from .backward_kernels import dx_kernel, merge_dx_kernel, reduce_combine_kernel, reduce_partial_kernel
from .direct import Launcher
from .epilogue_jit import ACTIVATION_CODES
from .group_kernels import group_backward_kernel, group_forward_kernel, param_sums_kernel
from .stats_kernels import fused_forward_kernel, stats_combine_kernel, stats_partial_kernel

Tensor = torch.Tensor

_FLAGS = ("HAS_WEIGHT", "HAS_BIAS", "HAS_SCALE", "HAS_SHIFT")
# One launcher per kernel; the names are its constexpr parameters, in signature order.
FUSED = Launcher(fused_forward_kernel, ("CPG", "CHANNELS_LAST", *_FLAGS, "ACTIVATION", "ACC", "BLOCK",
                                        "WRITE_STATS"))
GROUP_FORWARD = Launcher(group_forward_kernel, ("CPG", "CHANNELS_LAST", *_FLAGS, "ACTIVATION", "ACC", "BLOCK",
                                                "WRITE_STATS", "TILE_C", "TILE_HW"))
STATS_PARTIAL = Launcher(stats_partial_kernel, ("CPG", "CHANNELS_LAST", "ACC", "BLOCK"))
STATS_COMBINE = Launcher(stats_combine_kernel, ("WRITE_M2", "WRITE_RSTD", "BLOCK_S"))
APPLY = Launcher(apply_kernel, ("CPG", "CHANNELS_LAST", *_FLAGS, "ACTIVATION", "ACC", "BLOCK", "MERGE", "BLOCK_S"))
REDUCE_PARTIAL = Launcher(reduce_partial_kernel, ("CPG", *_FLAGS, "ACTIVATION", "ACC", "BLOCK_C", "BLOCK_HW"))
REDUCE_COMBINE = Launcher(reduce_combine_kernel, ("ACC", "BLOCK"))
MERGE_DX = Launcher(merge_dx_kernel, ("CPG", "BLOCK_CPG", "CHANNELS_LAST", *_FLAGS, "ACTIVATION", "ACC", "BLOCK",
                                      "NEED_DX", "WANT_DW", "WANT_DB"))
DX = Launcher(dx_kernel, ("CPG", "CHANNELS_LAST", *_FLAGS, "ACTIVATION", "ACC", "BLOCK"))
GROUP_BACKWARD = Launcher(group_backward_kernel, ("CPG", "CHANNELS_LAST", *_FLAGS, "ACTIVATION", "ACC", "BLOCK_CPG",
                                                  "BLOCK_HW", "NEED_DX", "WRITE_PARTIALS"))
PARAM_SUMS = Launcher(param_sums_kernel, ("HAS_WEIGHT", "HAS_BIAS", "ACC", "BLOCK"))
LAUNCHERS = (FUSED, GROUP_FORWARD, STATS_PARTIAL, STATS_COMBINE, APPLY, REDUCE_PARTIAL, REDUCE_COMBINE, MERGE_DX,
             DX, GROUP_BACKWARD, PARAM_SUMS)


def launch_count() -> int:
    """Kernel launches so far, by every launcher and path (the tests count per call)."""
    return sum(k.direct_launches + k.fallback_launches for k in LAUNCHERS)


def empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def empty_like(x: Tensor) -> Tensor:
    return torch.empty_like(x)  # keeps x's memory format


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return plan.CPU_NUM_SMS


def _sms_of(device_index: int) -> int:
    """num_sms for x.get_device() (-1: a CPU tensor, the interpreter)."""
    return plan.CPU_NUM_SMS if device_index < 0 else _cuda_sms(device_index)


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


class Layout:
    """(N, C, HW) view of x and its strides in elements; HW is all spatial dims flattened.
    ``device``: x.get_device() (-1 for a CPU tensor), what the launchers key on."""

    def __init__(self, x: Tensor, num_groups: int):
        shape = x.shape
        numel = int(x.numel())   # int(): plans need plain ints (torch.compile traces SymInts)
        if x.is_contiguous():
            channels_last = False
        else:
            fmt = _CHANNELS_LAST.get(len(shape))
            channels_last = (x.is_contiguous(memory_format=fmt) if fmt is not None
                             else x.movedim(1, -1).is_contiguous())
            if not channels_last:
                raise ValueError("triton groupnorm expects a contiguous or channels-last x")
        self._set(int(shape[0]), int(shape[1]), numel, num_groups, channels_last, x.get_device())

    @classmethod
    def known(cls, shape, numel: int, channels_last: bool, num_groups: int, device: int) -> "Layout":
        """The layout from facts the caller has read (the everyday path)."""
        lay = cls.__new__(cls)
        lay._set(shape[0], shape[1], numel, num_groups, channels_last, device)
        return lay

    def _set(self, n, c, numel, num_groups, channels_last, device):
        self.n, self.c = n, c
        self.hw = numel // max(n * c, 1)
        self.g = num_groups
        self.cpg = c // num_groups
        self.group_size = self.cpg * self.hw
        self.channels_last = channels_last
        if self.group_size >= 2 ** 31:
            raise ValueError("triton groupnorm: one group must hold fewer than 2^31 elements")
        self.stride_n = c * self.hw
        self.stride_c = 1 if channels_last else self.hw
        self.stride_hw = c if channels_last else 1
        self.rows = n * num_groups
        self.device = device

    @property
    def shape(self) -> plan.Shape:
        return plan.Shape(self.n, self.c, self.hw, self.g, self.channels_last)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc_tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _same_layout(t: Tensor, lay: Layout) -> Tensor:
    # dy may arrive in another memory format than x; the kernels index both alike.
    if lay.channels_last:
        return t if t.movedim(1, -1).is_contiguous() else t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.contiguous()


def _params(x: Tensor, weight, bias, scale, shift):
    """(pointer args, flags): absent tensors are replaced by x (never read: flag is off)."""
    ts = [t.contiguous() if t is not None else None for t in (weight, bias, scale, shift)]
    flags = (ts[0] is not None, ts[1] is not None, ts[2] is not None, ts[3] is not None)
    return [x if t is None else t for t in ts], flags


def _split_plan(lay: Layout):
    return plan.split_plan(lay.group_size, lay.g, _sms_of(lay.device), lay.channels_last)


def _stats_partials(x: Tensor, lay: Layout, p) -> Tensor:
    """Stage 1 of the split statistics under plan p -> (4, N * G, p.split) partials in ACC."""
    # Partials are internal scratch: never poisoned, fully written by stage 1.
    parts = torch.empty((4, lay.rows, p.split), dtype=acc_dtype(x.dtype), device=x.device)
    STATS_PARTIAL((lay.rows, p.split), (
        x, parts[0], parts[1], parts[2], parts[3],
        lay.c, lay.hw, lay.g, lay.group_size, lay.stride_n, lay.stride_c, p.chunk, p.split),
        (lay.cpg, lay.channels_last, _acc_tl(x.dtype), p.block), p.num_warps, lay.device)
    return parts


def stats(x: Tensor, num_groups: int) -> Tuple[Tensor, Tensor]:
    lay = Layout(x, num_groups)
    p = _split_plan(lay)
    parts = _stats_partials(x, lay, p)
    acc = acc_dtype(x.dtype)
    mean = empty((lay.n, lay.g), acc, x.device)
    m2 = empty((lay.n, lay.g), acc, x.device)
    STATS_COMBINE((lay.rows,), (parts[0], parts[1], parts[2], parts[3], mean, m2, mean, p.split, 0.0),
                  (True, False, plan.next_power_of_2(p.split)), 1, lay.device)
    return mean, m2


def _apply(x, lay: Layout, mean, rstd, weight, bias, scale, shift, activation: str, eps: float = 0.0,
           parts=None, p=None) -> Tensor:
    """y from given statistics, or (``parts``, made under the same plan p) from stage-1
    partials merged in the same launch, which then also writes ``mean`` and ``rstd``."""
    y = empty_like(x)
    ptrs, flags = _params(x, weight, bias, scale, shift)
    p = p or _split_plan(lay)
    merge = parts is not None
    split_s = p.split if merge else 1
    pp = (parts[0], parts[1], parts[2], parts[3]) if merge else (mean, mean, mean, mean)
    APPLY((lay.rows, p.split), (
        x, y, mean, rstd, *ptrs, *pp,
        lay.c, lay.hw, lay.g, lay.group_size, lay.stride_n, lay.stride_c, p.chunk, split_s, float(eps)),
        (lay.cpg, lay.channels_last, *flags, ACTIVATION_CODES[activation], _acc_tl(x.dtype), p.block, merge,
         plan.next_power_of_2(split_s)), p.num_warps, lay.device)
    return y


def apply(x, mean, rstd, weight, bias, scale, shift, num_groups: int, activation: str) -> Tensor:
    lay = Layout(x, num_groups)
    return _apply(x, lay, mean.contiguous(), rstd.contiguous(), weight, bias, scale, shift, activation)


def forward(x, weight, bias, scale, shift, num_groups: int, eps: float, activation: str):
    lay = Layout(x, num_groups)
    acc = acc_dtype(x.dtype)
    mean = empty((lay.n, lay.g), acc, x.device)
    rstd = empty((lay.n, lay.g), acc, x.device)
    y = _forward(x, lay, weight, bias, scale, shift, eps, activation, mean, rstd)
    return y, mean, rstd


_PLANS: dict = {}   # memo of forward and backward plans (a few us each on the host)


def forward_plan(lay: Layout) -> plan.ForwardPlan:
    key = (lay.n, lay.c, lay.hw, lay.g, lay.channels_last, lay.device, plan.knobs())
    p = _PLANS.get(key)
    if p is None:
        p = _PLANS[key] = plan.forward_plan(lay.shape, _sms_of(lay.device))
    return p


def _forward(x, lay: Layout, weight, bias, scale, shift, eps: float, activation: str, mean, rstd) -> Tensor:
    """y, the statistics written into mean and rstd ((N, G) in ACC; None: not wanted, and
    written nowhere on the one-launch paths), by the forward plan's path."""
    p = forward_plan(lay)
    if p.path == "split":
        if mean is None:
            acc = acc_dtype(x.dtype)
            mean = _scratch((lay.n, lay.g), acc, x.device)
            rstd = _scratch((lay.n, lay.g), acc, x.device)
        ptrs, flags = _params(x, weight, bias, scale, shift)
        done = onepass_launch.forward(x, lay, mean, rstd, ptrs, flags, eps, activation)
        if done is not None:  # one pass over x: programs sharing a group meet at a barrier
            return done[0]
        # Two launches: partial statistics, then apply (which merges them and writes mean/rstd).
        parts = _stats_partials(x, lay, p.split)
        return _apply(x, lay, mean, rstd, weight, bias, scale, shift, activation, eps, parts, p.split)
    y = empty_like(x)
    ptrs, flags = _params(x, weight, bias, scale, shift)
    common = (lay.cpg, lay.channels_last, *flags, ACTIVATION_CODES[activation], _acc_tl(x.dtype), p.block,
              mean is not None)
    if p.path == "group":
        kernel, common = GROUP_FORWARD, (*common, p.tile_c, p.tile_hw)
    else:
        kernel = FUSED
    kernel(p.grid, (
        x, y, *ptrs, x if mean is None else mean, x if rstd is None else rstd,
        lay.c, lay.hw, lay.g, lay.group_size, lay.stride_n, lay.stride_c, float(eps)),
        common, p.num_warps, lay.device)
    return y


def forward_output(x, weight, bias, scale, shift, num_groups: int, eps: float, activation: str) -> Tensor:
    """forward's y alone (nothing will differentiate the call): no statistics tensors
    returned, and none written where the path allows."""
    return _forward(x, Layout(x, num_groups), weight, bias, scale, shift, eps, activation, None, None)


def _reduce_plan(lay: Layout):
    return plan.reduce_plan(lay.n, lay.c, lay.hw, lay.channels_last, _sms_of(lay.device))


def _reduce_partials(dy, x, lay: Layout, mean, rstd, ptrs, flags, activation: str, p, alloc):
    """Stage 1 of the per-(n, c) sums under plan p -> (p1, p0), each (N, p.split, C) in ACC."""
    acc = acc_dtype(x.dtype)
    p1 = alloc((lay.n, p.split, lay.c), acc, x.device)
    p0 = alloc((lay.n, p.split, lay.c), acc, x.device)
    REDUCE_PARTIAL((lay.n, plan.cdiv(lay.c, p.block_c), p.split), (
        dy, x, mean, rstd, *ptrs, p1, p0,
        lay.c, lay.hw, lay.g, lay.stride_n, lay.stride_c, lay.stride_hw, p.chunk_hw, p.split),
        (lay.cpg, *flags, ACTIVATION_CODES[activation], _acc_tl(x.dtype), p.block_c, p.block_hw),
        p.num_warps, lay.device)
    return p1, p0


def _scratch(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def backward_reduce(dy, x, mean, rstd, weight, bias, scale, shift, num_groups: int, activation: str):
    lay = Layout(x, num_groups)
    dy = _same_layout(dy, lay)
    ptrs, flags = _params(x, weight, bias, scale, shift)
    # With one split the partials are the result (no second launch); else they are scratch.
    p = _reduce_plan(lay)
    p1, p0 = _reduce_partials(dy, x, lay, mean.contiguous(), rstd.contiguous(), ptrs, flags,
                              activation, p, empty if p.split == 1 else _scratch)
    if p.split == 1:
        return p1.view(lay.n, lay.c), p0.view(lay.n, lay.c)
    acc = acc_dtype(x.dtype)
    s1 = empty((lay.n, lay.c), acc, x.device)
    s0 = empty((lay.n, lay.c), acc, x.device)
    block = min(1024, plan.next_power_of_2(lay.c))
    REDUCE_COMBINE((lay.n, plan.cdiv(lay.c, block)), (p1, p0, s1, s0, lay.c, p.split),
                   (_acc_tl(x.dtype), block), max(1, min(8, block // 128)), lay.device)
    return s1, s0


def backward_plan(lay: Layout, param_sums: bool = True) -> plan.BackwardPlan:
    key = (lay.n, lay.c, lay.hw, lay.g, lay.channels_last, lay.device, plan.knobs(), param_sums)
    p = _PLANS.get(key)
    if p is None:
        p = _PLANS[key] = plan.backward_plan(lay.shape, _sms_of(lay.device), param_sums)
    return p


def backward_grads(dy, x, mean, rstd, weight, bias, scale, shift, num_groups: int, activation: str,
                   need_dx: bool = True):
    """(dx, dweight, dbias, dscale, dshift): one launch per group plus one for dweight /
    dbias where a group fits one program ("group" path), else two (tile partial sums,
    then their merge with the group and parameter terms and dx: ``merge_dx_kernel``). The contract's two stages plus ``grad_terms`` take
    about ten (torch's small reductions and casts among them), each a host-side cost that
    dominates small shapes."""
    lay = Layout(x, num_groups)
    dy = _same_layout(dy, lay)
    return _backward(dy, x, lay, mean.contiguous(), rstd.contiguous(), weight, bias, scale, shift, activation,
                     need_dx, weight is not None, bias is not None, scale is not None, shift is not None)


def _backward(dy, x, lay: Layout, mean, rstd, weight, bias, scale, shift, activation: str,
              need_dx: bool, need_w: bool, need_b: bool, need_scale: bool, need_shift: bool):
    """The backward on prepared arguments (dy in x's layout, contiguous statistics) ->
    (dx, dweight, dbias, dscale, dshift), None where absent or not needed."""
    p = backward_plan(lay, need_w or need_b)
    ptrs, flags = _params(x, weight, bias, scale, shift)
    if need_dx and p.path == "split":
        done = onepass_launch.backward(dy, x, lay, mean, rstd, ptrs, flags, (weight, bias, scale, shift),
                                       activation)
        if done is not None:  # x and dy read once from device memory; else the split path below
            return done
    grads = [empty(t.shape, t.dtype, x.device) if t is not None and need else None
             for t, need in ((weight, need_w), (bias, need_b), (scale, need_scale), (shift, need_shift))]
    acc = acc_dtype(x.dtype)
    acc_tl = _acc_tl(x.dtype)
    code = ACTIVATION_CODES[activation]
    if p.path == "group":
        dx = empty_like(x) if need_dx else None
        sums = need_w or need_b
        if sums:   # one scratch for both partials: an allocation is host time too
            partials = _scratch((2, lay.n, lay.c), acc, x.device)
            ka, kb = partials[0], partials[1]
        else:
            ka = kb = x
        ds = grads[2] if grads[2] is not None else x
        dt = grads[3] if grads[3] is not None else x
        # dscale / dshift are written when scale / shift are present; a gradient not
        # wanted goes to scratch.
        if flags[2] and grads[2] is None:
            ds = _scratch(scale.shape, scale.dtype, x.device)
        if flags[3] and grads[3] is None:
            dt = _scratch(shift.shape, shift.dtype, x.device)
        GROUP_BACKWARD(p.grid, (
            dy, x, x if dx is None else dx, mean, rstd, *ptrs, ka, kb, ds, dt, lay.c, lay.hw, lay.g),
            (lay.cpg, lay.channels_last, *flags, code, acc_tl, p.block_cpg, p.block_hw, need_dx, sums),
            p.num_warps, lay.device)
        if sums:
            dw = grads[0] if grads[0] is not None else x
            db = grads[1] if grads[1] is not None else x
            PARAM_SUMS(plan.param_grid(lay.c), (ka, kb, dw, db, lay.n, lay.c),
                       (grads[0] is not None, grads[1] is not None, acc_tl, plan.PARAM_BLOCK), 4, lay.device)
        return (dx, *grads)
    r = _reduce_plan(lay)
    p1, p0 = _reduce_partials(dy, x, lay, mean, rstd, ptrs, flags, activation, r, _scratch)
    dx = empty_like(x) if need_dx else None
    # dweight / dbias are written only when wanted; dscale / dshift whenever scale / shift
    # are present (a gradient not wanted goes to scratch).
    outs = [x if grads[0] is None else grads[0], x if grads[1] is None else grads[1]]
    outs += [g if g is not None else (_scratch(t.shape, t.dtype, x.device) if t is not None else x)
             for g, t in zip(grads[2:], (scale, shift))]
    sp = _split_plan(lay)
    MERGE_DX((lay.rows, sp.split if need_dx else 1), (
        dy, x, x if dx is None else dx, mean, rstd, *ptrs, p1, p0, *outs,
        lay.n, lay.c, lay.hw, lay.g, lay.group_size, lay.stride_n, lay.stride_c, sp.chunk, r.split),
        (lay.cpg, plan.next_power_of_2(lay.cpg), lay.channels_last, *flags, code, acc_tl, sp.block, need_dx,
         grads[0] is not None, grads[1] is not None), sp.num_warps, lay.device)
    return (dx, *grads)


def backward_dx(dy, x, mean, rstd, weight, bias, scale, shift, sum_dxhat, sum_dxhat_xhat,
                count: int, num_groups: int, activation: str) -> Tensor:
    lay = Layout(x, num_groups)
    ptrs, flags = _params(x, weight, bias, scale, shift)
    return _dx(_same_layout(dy, lay), x, lay, mean.contiguous(), rstd.contiguous(), ptrs, flags,
               sum_dxhat.contiguous(), sum_dxhat_xhat.contiguous(), count, activation)


def _dx(dy, x, lay: Layout, mean, rstd, ptrs, flags, sum_dxhat, sum_dxhat_xhat, count: int,
        activation: str) -> Tensor:
    """The dx launch on prepared arguments (backward_grads reuses its layout and pointers:
    each torch call on the host costs microseconds)."""
    dx = empty_like(x)
    p = _split_plan(lay)
    DX((lay.rows, p.split), (
        dy, x, dx, mean, rstd, *ptrs, sum_dxhat, sum_dxhat_xhat, int(count),
        lay.c, lay.hw, lay.g, lay.group_size, lay.stride_n, lay.stride_c, p.chunk),
        (lay.cpg, lay.channels_last, *flags, ACTIVATION_CODES[activation], _acc_tl(x.dtype), p.block),
        p.num_warps, lay.device)
    return dx
