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
from .backward_kernels import dx_kernel, finish_kernel, reduce_combine_kernel, reduce_partial_kernel
from .epilogue_jit import ACTIVATION_CODES
from .stats_kernels import fused_forward_kernel, stats_combine_kernel, stats_partial_kernel

Tensor = torch.Tensor


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


class Layout:
    """(N, C, HW) view of x and its strides in elements; HW is all spatial dims flattened."""

    def __init__(self, x: Tensor, num_groups: int):
        self.n, self.c = x.shape[0], x.shape[1]
        self.hw = x.numel() // max(self.n * self.c, 1)
        self.g = num_groups
        self.cpg = self.c // num_groups
        self.group_size = self.cpg * self.hw
        self.channels_last = not x.is_contiguous()
        if self.channels_last and not x.movedim(1, -1).is_contiguous():
            raise ValueError("triton groupnorm expects a contiguous or channels-last x")
        if self.group_size >= 2 ** 31:
            raise ValueError("triton groupnorm: one group must hold fewer than 2^31 elements")
        self.stride_n = self.c * self.hw
        self.stride_c = 1 if self.channels_last else self.hw
        self.stride_hw = self.c if self.channels_last else 1
        self.rows = self.n * self.g


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
    # (pointer args, flags): absent tensors are replaced by x (never read: flag is off).
    ts = [t.contiguous() if t is not None else None for t in (weight, bias, scale, shift)]
    flags = dict(HAS_WEIGHT=ts[0] is not None, HAS_BIAS=ts[1] is not None,
                 HAS_SCALE=ts[2] is not None, HAS_SHIFT=ts[3] is not None)
    return [x if t is None else t for t in ts], flags


def _split_plan(x: Tensor, lay: Layout):
    return plan.split_plan(lay.group_size, lay.rows, num_sms(x.device), lay.channels_last)


def _stats_partials(x: Tensor, lay: Layout, p) -> Tensor:
    """Stage 1 of the split statistics under plan p -> (4, N * G, p.split) partials in ACC."""
    # Partials are internal scratch: never poisoned, fully written by stage 1.
    parts = torch.empty((4, lay.rows, p.split), dtype=acc_dtype(x.dtype), device=x.device)
    stats_partial_kernel[(lay.rows, p.split)](
        x, parts[0], parts[1], parts[2], parts[3],
        lay.c, lay.hw, lay.g, lay.group_size, lay.stride_n, lay.stride_c, p.chunk, p.split,
        CPG=lay.cpg, CHANNELS_LAST=lay.channels_last, ACC=_acc_tl(x.dtype), BLOCK=p.block,
        num_warps=p.num_warps)
    return parts


def stats(x: Tensor, num_groups: int) -> Tuple[Tensor, Tensor]:
    lay = Layout(x, num_groups)
    p = _split_plan(x, lay)
    parts = _stats_partials(x, lay, p)
    acc = acc_dtype(x.dtype)
    mean = empty((lay.n, lay.g), acc, x.device)
    m2 = empty((lay.n, lay.g), acc, x.device)
    stats_combine_kernel[(lay.rows,)](
        parts[0], parts[1], parts[2], parts[3], mean, m2, mean, p.split, 0.0,
        WRITE_M2=True, WRITE_RSTD=False, BLOCK_S=plan.next_power_of_2(p.split), num_warps=1)
    return mean, m2


def _apply(x, lay: Layout, mean, rstd, weight, bias, scale, shift, activation: str, eps: float = 0.0,
           parts=None, p=None) -> Tensor:
    """y from given statistics, or (``parts``, made under the same plan p) from stage-1
    partials merged in the same launch, which then also writes ``mean`` and ``rstd``."""
    y = empty_like(x)
    ptrs, flags = _params(x, weight, bias, scale, shift)
    p = p or _split_plan(x, lay)
    merge = parts is not None
    split_s = p.split if merge else 1
    pp = (parts[0], parts[1], parts[2], parts[3]) if merge else (mean, mean, mean, mean)
    apply_kernel[(lay.rows, p.split)](
        x, y, mean, rstd, *ptrs, *pp,
        lay.c, lay.hw, lay.g, lay.group_size, lay.stride_n, lay.stride_c, p.chunk, split_s, eps,
        CPG=lay.cpg, CHANNELS_LAST=lay.channels_last, **flags,
        ACTIVATION=ACTIVATION_CODES[activation], ACC=_acc_tl(x.dtype), BLOCK=p.block,
        MERGE=merge, BLOCK_S=plan.next_power_of_2(split_s), num_warps=p.num_warps)
    return y


def apply(x, mean, rstd, weight, bias, scale, shift, num_groups: int, activation: str) -> Tensor:
    lay = Layout(x, num_groups)
    return _apply(x, lay, mean.contiguous(), rstd.contiguous(), weight, bias, scale, shift, activation)


def forward(x, weight, bias, scale, shift, num_groups: int, eps: float, activation: str):
    lay = Layout(x, num_groups)
    acc = acc_dtype(x.dtype)
    mean = empty((lay.n, lay.g), acc, x.device)
    rstd = empty((lay.n, lay.g), acc, x.device)
    if not plan.use_fused(lay.group_size):
        ptrs, flags = _params(x, weight, bias, scale, shift)
        done = onepass_launch.forward(x, lay, mean, rstd, ptrs, flags, eps, activation)
        if done is not None:  # one pass over x (issue 26); else the split path below
            return done
        # Two launches: partial statistics, then apply (which merges them and writes mean/rstd).
        p = _split_plan(x, lay)   # the same plan for both launches
        parts = _stats_partials(x, lay, p)
        y = _apply(x, lay, mean, rstd, weight, bias, scale, shift, activation, eps, parts, p)
        return y, mean, rstd
    y = empty_like(x)
    ptrs, flags = _params(x, weight, bias, scale, shift)
    p = plan.fused_plan(lay.group_size)
    fused_forward_kernel[(lay.rows,)](
        x, y, *ptrs, mean, rstd,
        lay.c, lay.hw, lay.g, lay.group_size, lay.stride_n, lay.stride_c, eps,
        CPG=lay.cpg, CHANNELS_LAST=lay.channels_last, **flags,
        ACTIVATION=ACTIVATION_CODES[activation], ACC=_acc_tl(x.dtype), BLOCK=p.block,
        num_warps=p.num_warps)
    return y, mean, rstd


def _reduce_plan(x: Tensor, lay: Layout):
    return plan.reduce_plan(lay.n, lay.c, lay.hw, lay.channels_last, num_sms(x.device))


def _reduce_partials(dy, x, lay: Layout, mean, rstd, ptrs, flags, activation: str, p, alloc):
    """Stage 1 of the per-(n, c) sums under plan p -> (p1, p0), each (N, p.split, C) in ACC."""
    acc = acc_dtype(x.dtype)
    p1 = alloc((lay.n, p.split, lay.c), acc, x.device)
    p0 = alloc((lay.n, p.split, lay.c), acc, x.device)
    reduce_partial_kernel[(lay.n, plan.cdiv(lay.c, p.block_c), p.split)](
        dy, x, mean, rstd, *ptrs, p1, p0,
        lay.c, lay.hw, lay.g, lay.stride_n, lay.stride_c, lay.stride_hw, p.chunk_hw, p.split,
        CPG=lay.cpg, **flags, ACTIVATION=ACTIVATION_CODES[activation], ACC=_acc_tl(x.dtype),
        BLOCK_C=p.block_c, BLOCK_HW=p.block_hw, num_warps=p.num_warps)
    return p1, p0


def _scratch(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def backward_reduce(dy, x, mean, rstd, weight, bias, scale, shift, num_groups: int, activation: str):
    lay = Layout(x, num_groups)
    dy = _same_layout(dy, lay)
    ptrs, flags = _params(x, weight, bias, scale, shift)
    # With one split the partials are the result (no second launch); else they are scratch.
    p = _reduce_plan(x, lay)
    p1, p0 = _reduce_partials(dy, x, lay, mean.contiguous(), rstd.contiguous(), ptrs, flags,
                              activation, p, empty if p.split == 1 else _scratch)
    if p.split == 1:
        return p1.view(lay.n, lay.c), p0.view(lay.n, lay.c)
    acc = acc_dtype(x.dtype)
    s1 = empty((lay.n, lay.c), acc, x.device)
    s0 = empty((lay.n, lay.c), acc, x.device)
    block = min(1024, plan.next_power_of_2(lay.c))
    reduce_combine_kernel[(lay.n, plan.cdiv(lay.c, block))](
        p1, p0, s1, s0, lay.c, p.split, ACC=_acc_tl(x.dtype), BLOCK=block,
        num_warps=max(1, min(8, block // 128)))
    return s1, s0


def backward_grads(dy, x, mean, rstd, weight, bias, scale, shift, num_groups: int, activation: str,
                   need_dx: bool = True):
    """(dx, dweight, dbias, dscale, dshift) in three launches: partial sums, the group and
    parameter terms (finish_kernel), dx. The contract's two stages plus ``grad_terms`` take
    about ten (torch's small reductions and casts among them), each a host-side cost that
    dominates small shapes."""
    lay = Layout(x, num_groups)
    dy = _same_layout(dy, lay)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    ptrs, flags = _params(x, weight, bias, scale, shift)
    if need_dx and not plan.use_fused(lay.group_size):
        done = onepass_launch.backward(dy, x, lay, mean, rstd, ptrs, flags, (weight, bias, scale, shift),
                                       activation)
        if done is not None:  # x and dy read once (issue 26); else the split path below
            return done
    p = _reduce_plan(x, lay)
    p1, p0 = _reduce_partials(dy, x, lay, mean, rstd, ptrs, flags, activation, p, _scratch)
    acc = acc_dtype(x.dtype)
    sdx = _scratch((lay.n, lay.g), acc, x.device)
    sdxx = _scratch((lay.n, lay.g), acc, x.device)
    grads = [None if t is None else empty(t.shape, t.dtype, x.device) for t in (weight, bias, scale, shift)]
    outs = [x if t is None else t for t in grads]
    block_cpg = plan.next_power_of_2(lay.cpg)
    finish_kernel[(lay.g,)](
        p1, p0, ptrs[0], ptrs[1], ptrs[2], sdx, sdxx, *outs, lay.n, lay.c, lay.g, p.split,
        CPG=lay.cpg, BLOCK_CPG=block_cpg, **flags, ACC=_acc_tl(x.dtype),
        num_warps=max(1, min(8, block_cpg // 256)))
    dx = _dx(dy, x, lay, mean, rstd, ptrs, flags, sdx, sdxx, lay.group_size, activation) if need_dx else None
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
    p = _split_plan(x, lay)
    dx_kernel[(lay.rows, p.split)](
        dy, x, dx, mean, rstd, *ptrs, sum_dxhat, sum_dxhat_xhat, int(count),
        lay.c, lay.hw, lay.g, lay.group_size, lay.stride_n, lay.stride_c, p.chunk,
        CPG=lay.cpg, CHANNELS_LAST=lay.channels_last, **flags,
        ACTIVATION=ACTIVATION_CODES[activation], ACC=_acc_tl(x.dtype), BLOCK=p.block,
        num_warps=p.num_warps)
    return dx
