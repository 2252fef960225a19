"""Backward kernels: per-(n, c) sums (two deterministic stages) and the input gradient.

The math. Forward, per group (count elements):
    xhat = (x - mean) * rstd,  z1 = (xhat * w[c] + b[c]) * (1 + scale[n, c]) + shift[n, c],
    y = act(z1).
Backward, with dy = dL/dy:
    dz1   = dy * act'(z1)                 (z1 recomputed from x and the statistics)
    dxhat = dz1 * (1 + scale[n, c]) * w[c]
    dL/dw[c] = sum_{n, hw} dz1 (1 + scale) xhat,  dL/db[c] = sum_{n, hw} dz1 (1 + scale),
    dL/dscale[n, c] = sum_hw dz1 z0,  dL/dshift[n, c] = sum_hw dz1,
all of which follow from the per-(n, c) sums S1 = sum_hw dz1 * xhat and S0 = sum_hw dz1
(``backward_reduce``). Through mean and rstd, with d mean / dx = 1 / count and
d rstd / dx = -rstd^3 (x - mean) / count:
    dx = rstd * (dxhat - sum_g(dxhat) / count - xhat * sum_g(dxhat * xhat) / count),
where the two group sums (N, G) are built by the caller from S0, S1 (and may be all-reduced
across ranks, so ``count`` is the global element count per group) — ``backward_dx``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .epilogue_jit import activation_grad, dxhat_factor, group_offsets, pre_activation


@triton.jit
def reduce_partial_kernel(
    dy_ptr,     # (N, C, *) upstream gradient, x's memory format
    x_ptr,      # (N, C, *) input, NCHW or channels-last
    mean_ptr,   # (N, G) mean
    rstd_ptr,   # (N, G) rstd
    w_ptr,      # (C,) weight (unused without HAS_WEIGHT)
    b_ptr,      # (C,) bias (unused without HAS_BIAS)
    scale_ptr,  # (N, C) scale (unused without HAS_SCALE)
    shift_ptr,  # (N, C) shift (unused without HAS_SHIFT)
    s1_ptr,     # (N, SPLIT, C) partial sum(dz1 * xhat) out, ACC
    s0_ptr,     # (N, SPLIT, C) partial sum(dz1) out, ACC
    C, HW, G, stride_x_n, stride_x_c, stride_x_hw, CHUNK_HW, SPLIT,
    CPG: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Stage 1: program (n, channel block, s) sums tiles [BLOCK_C, BLOCK_HW] over its HW chunk.

    Accumulates elementwise in ACC registers, reduces along HW once at the end and writes
    one float partial per channel: no atomics.
    """
    n = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    s = tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    row = n * G + c // CPG
    mean = tl.load(mean_ptr + row, mask=c_mask, other=0.0).to(ACC)
    rstd = tl.load(rstd_ptr + row, mask=c_mask, other=0.0).to(ACC)
    base = n * stride_x_n
    c_offs = c.to(tl.int64) * stride_x_c
    acc1 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    acc0 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    for start in range(0, CHUNK_HW, BLOCK_HW):
        hw = s * CHUNK_HW + start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        offs = base + c_offs[:, None] + hw.to(tl.int64)[None, :] * stride_x_hw
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        xhat = (x - mean[:, None]) * rstd[:, None]
        if ACTIVATION != 0:
            cc = c[:, None] + tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.int32)
            z = pre_activation(xhat, n, cc, mask, C, w_ptr, b_ptr, scale_ptr, shift_ptr,
                               HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
            dz = dz * activation_grad(z, ACTIVATION)
        dz = tl.where(mask, dz, 0.0)
        acc1 += dz * xhat
        acc0 += dz
    out = n * SPLIT * C + s * C + c
    tl.store(s1_ptr + out, tl.sum(acc1, axis=1), mask=c_mask)
    tl.store(s0_ptr + out, tl.sum(acc0, axis=1), mask=c_mask)


@triton.jit
def reduce_combine_kernel(
    p1_ptr,   # (N, SPLIT, C) partial sum(dz1 * xhat), ACC
    p0_ptr,   # (N, SPLIT, C) partial sum(dz1), ACC
    s1_ptr,   # (N, C) sum(dz1 * xhat) out, ACC
    s0_ptr,   # (N, C) sum(dz1) out, ACC
    C, SPLIT,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Stage 2: sum the SPLIT partials of each (n, c) in the fixed order s = 0, 1, ..."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    acc1 = tl.zeros([BLOCK], dtype=ACC)
    acc0 = tl.zeros([BLOCK], dtype=ACC)
    for s in range(0, SPLIT):
        offs = n * SPLIT * C + s * C + c
        acc1 += tl.load(p1_ptr + offs, mask=mask, other=0.0)
        acc0 += tl.load(p0_ptr + offs, mask=mask, other=0.0)
    tl.store(s1_ptr + n * C + c, acc1, mask=mask)
    tl.store(s0_ptr + n * C + c, acc0, mask=mask)


@triton.jit
def dx_kernel(
    dy_ptr,     # (N, C, *) upstream gradient, x's memory format
    x_ptr,      # (N, C, *) input, NCHW or channels-last
    dx_ptr,     # (N, C, *) input gradient out, x's dtype and memory format
    mean_ptr,   # (N, G) mean
    rstd_ptr,   # (N, G) rstd
    w_ptr,      # (C,) weight (unused without HAS_WEIGHT)
    b_ptr,      # (C,) bias (unused without HAS_BIAS)
    scale_ptr,  # (N, C) scale (unused without HAS_SCALE)
    shift_ptr,  # (N, C) shift (unused without HAS_SHIFT)
    sdx_ptr,    # (N, G) sum over the group of dxhat
    sdxx_ptr,   # (N, G) sum over the group of dxhat * xhat
    count,      # global element count per group (int)
    C, HW, G, group_size, stride_x_n, stride_x_c, CHUNK,
    CPG: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (row, s): dx = rstd (dxhat - sdx / count - xhat sdxx / count) on its chunk."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    n = row // G
    g = row % G
    base = n * stride_x_n + g * CPG * stride_x_c
    mean = tl.load(mean_ptr + row).to(ACC)
    rstd = tl.load(rstd_ptr + row).to(ACC)
    inv_count = 1.0 / tl.maximum(tl.zeros((), dtype=ACC) + count, 1.0)
    mean_dxhat = tl.load(sdx_ptr + row).to(ACC) * inv_count
    mean_dxhat_xhat = tl.load(sdxx_ptr + row).to(ACC) * inv_count
    for start in range(0, CHUNK, BLOCK):
        i = s * CHUNK + start + tl.arange(0, BLOCK)
        mask = i < group_size
        offs, c_local = group_offsets(i, C, HW, CPG, CHANNELS_LAST)
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        dz = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        c = g * CPG + c_local
        xhat = (x - mean) * rstd
        if ACTIVATION != 0:
            z = pre_activation(xhat, n, c, mask, C, w_ptr, b_ptr, scale_ptr, shift_ptr,
                               HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
            dz = dz * activation_grad(z, ACTIVATION)
        dxhat = dxhat_factor(dz, n, c, mask, C, w_ptr, scale_ptr, HAS_WEIGHT, HAS_SCALE)
        dx = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
        tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def merge_dx_kernel(
    dy_ptr,     # (N, C, *) upstream gradient, x's memory format
    x_ptr,      # (N, C, *) input, NCHW or channels-last
    dx_ptr,     # (N, C, *) input gradient out (unused without NEED_DX)
    mean_ptr,   # (N, G) mean
    rstd_ptr,   # (N, G) rstd
    w_ptr,      # (C,) weight (unused without HAS_WEIGHT)
    b_ptr,      # (C,) bias (unused without HAS_BIAS)
    scale_ptr,  # (N, C) scale (unused without HAS_SCALE)
    shift_ptr,  # (N, C) shift (unused without HAS_SHIFT)
    p1_ptr,     # (N, SPLIT_R, C) partial sum(dz1 * xhat), ACC (reduce_partial_kernel's output)
    p0_ptr,     # (N, SPLIT_R, C) partial sum(dz1), ACC
    dw_ptr,     # (C,) out: dweight (unused without WANT_DW)
    db_ptr,     # (C,) out: dbias (unused without WANT_DB)
    ds_ptr,     # (N, C) out: dscale (unused without HAS_SCALE)
    dt_ptr,     # (N, C) out: dshift (unused without HAS_SHIFT)
    N, C, HW, G, group_size, stride_x_n, stride_x_c, CHUNK, SPLIT_R,
    CPG: tl.constexpr, BLOCK_CPG: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    NEED_DX: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
):
    """The backward's second launch on the split path: program (row, s) merges its group's
    per-channel partials (the SPLIT_R tiles of ``reduce_partial_kernel``, summed in the
    fixed order s' = 0, 1, ...), forms the group terms and writes dx on its chunk; the
    programs s = 0 also write dscale / dshift of (n, group g), and program (0, g, 0) sums
    dweight / dbias of group g's channels over n in order. No atomics: the same bits on
    every run. Two launches in all (the partials, this), where a separate finishing
    kernel made three."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    n = row // G
    g = row % G
    j = tl.arange(0, BLOCK_CPG)
    c_mask = j < CPG
    c = g * CPG + j
    w = tl.full([BLOCK_CPG], 1.0, ACC)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(ACC)
    a_sum = tl.zeros([BLOCK_CPG], dtype=ACC)
    b_sum = tl.zeros([BLOCK_CPG], dtype=ACC)
    for r in range(0, SPLIT_R):
        a_sum += tl.load(p1_ptr + (n * SPLIT_R + r) * C + c, mask=c_mask, other=0.0)
        b_sum += tl.load(p0_ptr + (n * SPLIT_R + r) * C + c, mask=c_mask, other=0.0)
    nc = n * C + c
    k = tl.full([BLOCK_CPG], 1.0, ACC)
    if HAS_SCALE:
        k = 1.0 + tl.load(scale_ptr + nc, mask=c_mask, other=0.0).to(ACC)
    if s == 0:
        if HAS_SCALE:
            bias = tl.zeros([BLOCK_CPG], dtype=ACC)
            if HAS_BIAS:
                bias = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(ACC)
            tl.store(ds_ptr + nc, (w * a_sum + bias * b_sum).to(ds_ptr.dtype.element_ty), mask=c_mask)
        if HAS_SHIFT:
            tl.store(dt_ptr + nc, b_sum.to(dt_ptr.dtype.element_ty), mask=c_mask)
        if WANT_DW or WANT_DB:
            if n == 0:
                dw = tl.zeros([BLOCK_CPG], dtype=ACC)
                db = tl.zeros([BLOCK_CPG], dtype=ACC)
                for m in range(0, N):
                    am = tl.zeros([BLOCK_CPG], dtype=ACC)
                    bm = tl.zeros([BLOCK_CPG], dtype=ACC)
                    for r in range(0, SPLIT_R):
                        am += tl.load(p1_ptr + (m * SPLIT_R + r) * C + c, mask=c_mask, other=0.0)
                        bm += tl.load(p0_ptr + (m * SPLIT_R + r) * C + c, mask=c_mask, other=0.0)
                    km = tl.full([BLOCK_CPG], 1.0, ACC)
                    if HAS_SCALE:
                        km = 1.0 + tl.load(scale_ptr + m * C + c, mask=c_mask, other=0.0).to(ACC)
                    dw += km * am
                    db += km * bm
                if WANT_DW:
                    tl.store(dw_ptr + c, dw.to(dw_ptr.dtype.element_ty), mask=c_mask)
                if WANT_DB:
                    tl.store(db_ptr + c, db.to(db_ptr.dtype.element_ty), mask=c_mask)
    if NEED_DX:
        base = n * stride_x_n + g * CPG * stride_x_c
        mean = tl.load(mean_ptr + row).to(ACC)
        rstd = tl.load(rstd_ptr + row).to(ACC)
        inv_count = 1.0 / (tl.zeros((), dtype=ACC) + group_size)
        mean_dxhat = tl.sum(tl.where(c_mask, w * k * b_sum, 0.0), axis=0) * inv_count
        mean_dxhat_xhat = tl.sum(tl.where(c_mask, w * k * a_sum, 0.0), axis=0) * inv_count
        for start in range(0, CHUNK, BLOCK):
            i = s * CHUNK + start + tl.arange(0, BLOCK)
            mask = i < group_size
            offs, c_local = group_offsets(i, C, HW, CPG, CHANNELS_LAST)
            x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC)
            dz = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(ACC)
            ce = g * CPG + c_local
            xhat = (x - mean) * rstd
            if ACTIVATION != 0:
                z = pre_activation(xhat, n, ce, mask, C, w_ptr, b_ptr, scale_ptr, shift_ptr,
                                   HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
                dz = dz * activation_grad(z, ACTIVATION)
            dxhat = dxhat_factor(dz, n, ce, mask, C, w_ptr, scale_ptr, HAS_WEIGHT, HAS_SCALE)
            dx = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
            tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
