"""One-pass backward for groups too large for one program: x and dy read once, dx written once.

Same rows, tiles, waves, PHASEs and barrier as the forward (``onepass_kernels``). With dz1 =
dy * act'(z1), a = w (1 + scale) and xhat from the forward's statistics, a program

  1. sums dz1 * xhat and dz1 per channel over its tiles (S1, S0), publishes them per
     (n, split, c) for the parameter gradients, and a * S1, a * S0 per group per split,
  2. meets its row at the barrier (PHASE 0),
  3. sums the row's per-group partials in a fixed order -> sum_g(dxhat), sum_g(dxhat xhat),
  4. writes dx = rstd (dxhat - sum_g(dxhat) / count - xhat sum_g(dxhat xhat) / count) for
     the tile it still holds (or re-reads, K > 1).

``param_grads_kernel`` then sums the per-channel partials over splits and samples in a fixed
order (no float atomics): dweight, dbias, dscale, dshift are bitwise repeatable.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .epilogue_jit import activation_grad
from .onepass_kernels import (_row_groups, channel_affine, channels_to_groups, groups_to_channels,
                              row_barrier, row_base, tile_offsets)


@triton.jit
def _dz(dyr, xhat, mask, a, bb, ACTIVATION: tl.constexpr):
    """dz1 (0 where masked) from dy and xhat; a, bb are [BLOCK_C, 1]."""
    dz = dyr.to(xhat.dtype)
    if ACTIVATION != 0:
        dz = dz * activation_grad(xhat * a + bb, ACTIVATION)
    return tl.where(mask, dz, 0.0)


@triton.jit
def _backward_row(
    row, s, dy_ptr, x_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
    chan_ptr, grp_ptr, bar_ptr,
    C, HW, G, NSPAN, stride_n, stride_c, stride_hw, SPLIT, chan_stride, grp_stride, count,
    CPG: tl.constexpr, SPAN_G: tl.constexpr, K: tl.constexpr, PHASE: tl.constexpr, WIDE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_G: tl.constexpr, MERGE_S: tl.constexpr,
):
    SPAN_C = SPAN_G * CPG
    n, sp, grows, gmask, onehot, cl, cmask = _row_groups(row, NSPAN, G, CPG, SPAN_G, BLOCK_C, BLOCK_G)
    base = row_base(n, sp, stride_n, stride_c, SPAN_C)
    mean = groups_to_channels(tl.load(mean_ptr + grows, mask=gmask, other=0.0).to(ACC), onehot)[:, None]
    rstd = groups_to_channels(tl.load(rstd_ptr + grows, mask=gmask, other=0.0).to(ACC), onehot)[:, None]
    c = sp * SPAN_C + cl
    a_c, b_c = channel_affine(n, c, cmask, C, w_ptr, b_ptr, scale_ptr, shift_ptr, ACC,
                              HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
    a = a_c[:, None]
    bb = b_c[:, None]
    hw_first = s * (K * BLOCK_HW)
    if K == 1:  # x and dy stay in registers across the barrier
        offs, mask = tile_offsets(hw_first, HW, SPAN_C, stride_c, stride_hw, BLOCK_C, BLOCK_HW, WIDE)
        xr = tl.load(x_ptr + base + offs, mask=mask, other=0.0)
        dyr = tl.load(dy_ptr + base + offs, mask=mask, other=0.0)
        if PHASE != 2:
            xhat = (xr.to(ACC) - mean) * rstd
            dz = _dz(dyr, xhat, mask, a, bb, ACTIVATION)
            s1 = tl.sum(dz * xhat, axis=1)
            s0 = tl.sum(dz, axis=1)
    else:
        if PHASE != 2:
            s1 = tl.zeros([BLOCK_C], ACC)
            s0 = tl.zeros([BLOCK_C], ACC)
            for t in range(0, K):
                offs, mask = tile_offsets(hw_first + t * BLOCK_HW, HW, SPAN_C, stride_c, stride_hw,
                                          BLOCK_C, BLOCK_HW, WIDE)
                xhat = (tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC) - mean) * rstd
                dz = _dz(tl.load(dy_ptr + base + offs, mask=mask, other=0.0), xhat, mask, a, bb, ACTIVATION)
                s1 += tl.sum(dz * xhat, axis=1)
                s0 += tl.sum(dz, axis=1)
    if PHASE != 2:
        pc = chan_ptr + (n * SPLIT + s) * C + c
        tl.store(pc, s1, mask=cmask)
        tl.store(pc + chan_stride, s0, mask=cmask)
        pg = grp_ptr + grows * SPLIT + s
        tl.store(pg, channels_to_groups(a_c * s1, onehot), mask=gmask)
        tl.store(pg + grp_stride, channels_to_groups(a_c * s0, onehot), mask=gmask)
    if PHASE == 0:
        row_barrier(bar_ptr + row, s == 0, SPLIT)
    if PHASE != 1:
        sdxx = tl.zeros([BLOCK_G], ACC)
        sdx = tl.zeros([BLOCK_G], ACC)
        for s0 in range(0, SPLIT, MERGE_S):  # fixed order, MERGE_S partials at a time
            si = s0 + tl.arange(0, MERGE_S)
            m = gmask[:, None] & (si < SPLIT)[None, :]
            p = grp_ptr + grows[:, None] * SPLIT + si[None, :]
            sdxx += tl.sum(tl.load(p, mask=m, other=0.0, cache_modifier=".cg"), axis=1)
            sdx += tl.sum(tl.load(p + grp_stride, mask=m, other=0.0, cache_modifier=".cg"), axis=1)
        inv_count = 1.0 / tl.maximum(tl.zeros((), ACC) + count, 1.0)
        sdxx = sdxx * inv_count
        sdx = sdx * inv_count
        mdx = groups_to_channels(sdx, onehot)[:, None]
        mdxx = groups_to_channels(sdxx, onehot)[:, None]
        if K == 1:
            xhat = (xr.to(ACC) - mean) * rstd
            dz = _dz(dyr, xhat, mask, a, bb, ACTIVATION)
            dx = rstd * (dz * a - mdx - xhat * mdxx)
            tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        else:
            for t in range(0, K):
                offs, mask = tile_offsets(hw_first + t * BLOCK_HW, HW, SPAN_C, stride_c, stride_hw,
                                          BLOCK_C, BLOCK_HW, WIDE)
                xhat = (tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC) - mean) * rstd
                dz = _dz(tl.load(dy_ptr + base + offs, mask=mask, other=0.0), xhat, mask, a, bb, ACTIVATION)
                dx = rstd * (dz * a - mdx - xhat * mdxx)
                tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def onepass_backward_kernel(
    dy_ptr,     # (N, C, *) upstream gradient, x's memory format
    x_ptr,      # (N, C, *) input
    dx_ptr,     # (N, C, *) input gradient out
    mean_ptr, rstd_ptr,         # (N, G) forward statistics, ACC
    w_ptr, b_ptr,               # (C,) (unused without HAS_WEIGHT / HAS_BIAS)
    scale_ptr, shift_ptr,       # (N, C) (unused without HAS_SCALE / HAS_SHIFT)
    chan_ptr,   # (2, N, SPLIT, C) scratch out: per-channel sum(dz1 xhat), sum(dz1), ACC
    grp_ptr,    # (2, N * G, SPLIT) scratch: per-group sum(a dz1 xhat), sum(a dz1), ACC
    bar_ptr,    # (ROWS,) int32 barrier words (PHASE 0 only)
    C, HW, G, NSPAN, stride_n, stride_c, stride_hw, ROWS, SPLIT, WAVES, chan_stride, grp_stride, count,
    CPG: tl.constexpr, SPAN_G: tl.constexpr, K: tl.constexpr, PHASE: tl.constexpr, WIDE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_G: tl.constexpr, MERGE_S: tl.constexpr,
):
    """dx and the per-channel partial sums; see the module docstring."""
    pid = tl.program_id(0)
    rows_per_wave = tl.num_programs(0) // SPLIT
    local = pid // SPLIT
    s = pid % SPLIT
    for wave in range(0, WAVES):
        row = wave * rows_per_wave + local
        if row < ROWS:
            _backward_row(row, s, dy_ptr, x_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr,
                          shift_ptr, chan_ptr, grp_ptr, bar_ptr, C, HW, G, NSPAN, stride_n, stride_c,
                          stride_hw, SPLIT, chan_stride, grp_stride, count, CPG, SPAN_G, K, PHASE, WIDE,
                          HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, ACTIVATION, ACC,
                          BLOCK_C, BLOCK_HW, BLOCK_G, MERGE_S)


@triton.jit
def param_grads_kernel(
    p1_ptr,     # (N, SPLIT, C) per-channel partial sum(dz1 xhat), ACC
    p0_ptr,     # (N, SPLIT, C) per-channel partial sum(dz1), ACC
    w_ptr, b_ptr,   # (C,) weight, bias (unused without the flags)
    scale_ptr,      # (N, C) scale (unused without HAS_SCALE)
    dw_ptr, db_ptr,  # (C,) dweight, dbias out (parameter dtype)
    ds_ptr, dt_ptr,  # (N, C) dscale, dshift out
    N, C, SPLIT,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Per (n, c): A = sum_s p1, B = sum_s p0 (tiles of splits, fixed order); dscale = w A + b B,
    dshift = B; dweight = sum_n (1 + scale) A, dbias = sum_n (1 + scale) B, n in order."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    w = tl.full([BLOCK_C], 1.0, ACC)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(ACC)
    b = tl.zeros([BLOCK_C], ACC)
    if HAS_BIAS:
        b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_C], ACC)
    db = tl.zeros([BLOCK_C], ACC)
    for n in range(0, N):
        a_sum = tl.zeros([BLOCK_C], ACC)
        b_sum = tl.zeros([BLOCK_C], ACC)
        for s0 in range(0, SPLIT, BLOCK_S):
            si = s0 + tl.arange(0, BLOCK_S)
            m = (si < SPLIT)[:, None] & cmask[None, :]
            offs = (n * SPLIT + si).to(tl.int64)[:, None] * C + c[None, :]
            a_sum += tl.sum(tl.load(p1_ptr + offs, mask=m, other=0.0), axis=0)
            b_sum += tl.sum(tl.load(p0_ptr + offs, mask=m, other=0.0), axis=0)
        nc = n * C + c
        k = tl.full([BLOCK_C], 1.0, ACC)
        if HAS_SCALE:
            k = 1.0 + tl.load(scale_ptr + nc, mask=cmask, other=0.0).to(ACC)
            tl.store(ds_ptr + nc, (w * a_sum + b * b_sum).to(ds_ptr.dtype.element_ty), mask=cmask)
        if HAS_SHIFT:
            tl.store(dt_ptr + nc, b_sum.to(dt_ptr.dtype.element_ty), mask=cmask)
        dw += k * a_sum
        db += k * b_sum
    if HAS_WEIGHT:
        tl.store(dw_ptr + c, dw.to(dw_ptr.dtype.element_ty), mask=cmask)
    if HAS_BIAS:
        tl.store(db_ptr + c, db.to(db_ptr.dtype.element_ty), mask=cmask)
