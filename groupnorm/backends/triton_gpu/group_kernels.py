"""One program per (n, g) group that loops over it: the forward and the backward in one
launch each for groups too large for registers but small enough to reread from L2.

A UNet group is 10-200 KB; the program reads it once for the statistics (or the
backward's sums) and again, soon after, for the output, mostly from L2. That makes the
forward one launch and the backward two (this kernel, then ``param_sums_kernel`` for
dweight/dbias), where the split path needs two and three: on the host each launch is
time the GPU waits for on UNet shapes.

Statistics: with k = the group's first element (the pivot) and xs = x - k, each lane runs
Welford's update over the full blocks (all lanes see the same count, so the division is
one scalar per block), the lanes merge with Chan's formula, and the last partial block
(a two-pass over its registers) merges in by Chan's pairwise formula. A fixed order:
the same bits on every run.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .epilogue_jit import activation, activation_grad, group_offsets, pre_activation


@triton.jit
def group_forward_kernel(
    x_ptr,      # (N, C, *) input, NCHW or channels-last
    y_ptr,      # (N, C, *) output, x's dtype and memory format
    w_ptr,      # (C,) weight (unused without HAS_WEIGHT)
    b_ptr,      # (C,) bias (unused without HAS_BIAS)
    scale_ptr,  # (N, C) scale (unused without HAS_SCALE)
    shift_ptr,  # (N, C) shift (unused without HAS_SHIFT)
    mean_ptr,   # (N, G) mean out, ACC (unused without WRITE_STATS)
    rstd_ptr,   # (N, G) rstd out, ACC (unused without WRITE_STATS)
    C, HW, G, group_size, stride_x_n, stride_x_c, eps,
    CPG: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    WRITE_STATS: tl.constexpr, TILE_C: tl.constexpr, TILE_HW: tl.constexpr,
):
    """Program row = n * G + g: statistics over the group, then y over it again.

    The statistics read the group as one flat run (its memory order). NCHW applies in
    tiles [TILE_C channels, TILE_HW positions], so each element's channel is its tile row
    (a flat index would need a division by the runtime HW per element) and the
    parameters are loaded once per row; channels-last applies flat (its channel is
    i % CPG, a constant divisor)."""
    row = tl.program_id(0).to(tl.int64)
    n = row // G
    g = row % G
    base = n * stride_x_n + g * CPG * stride_x_c
    lanes = tl.arange(0, BLOCK)
    pivot = tl.load(x_ptr + base).to(ACC)
    full = group_size // BLOCK
    mean_l = tl.zeros([BLOCK], dtype=ACC)
    m2_l = tl.zeros([BLOCK], dtype=ACC)
    for it in range(0, full):
        offs, _ = group_offsets(it * BLOCK + lanes, C, HW, CPG, CHANNELS_LAST)
        xs = tl.load(x_ptr + base + offs).to(ACC) - pivot
        delta = xs - mean_l
        mean_l += delta * (1.0 / (tl.zeros((), dtype=ACC) + (it + 1)))
        m2_l += delta * (xs - mean_l)
    k_full = (tl.zeros((), dtype=ACC) + full) * BLOCK
    mean_a = tl.sum(mean_l, axis=0) / BLOCK
    dev = mean_l - mean_a
    m2_a = tl.sum(m2_l + (k_full / BLOCK) * dev * dev, axis=0)
    # The last partial block (empty when BLOCK divides the group).
    i = full * BLOCK + lanes
    mask = i < group_size
    offs, _ = group_offsets(i, C, HW, CPG, CHANNELS_LAST)
    xt = tl.where(mask, tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC) - pivot, 0.0)
    k_t = tl.zeros((), dtype=ACC) + (group_size - full * BLOCK)
    mean_t = tl.sum(xt, axis=0) / tl.maximum(k_t, 1.0)
    dt = tl.where(mask, xt - mean_t, 0.0)
    m2_t = tl.sum(dt * dt, axis=0)
    count = k_full + k_t
    delta = mean_t - mean_a
    mean_s = mean_a + delta * (k_t / count)
    m2 = m2_a + m2_t + delta * delta * (k_full * k_t / count)
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    if WRITE_STATS:
        tl.store(mean_ptr + row, pivot + mean_s)
        tl.store(rstd_ptr + row, rstd)
    shift_s = pivot + mean_s
    if CHANNELS_LAST:
        for start in range(0, group_size, BLOCK):
            i = start + lanes
            mask = i < group_size
            offs, c_local = group_offsets(i, C, HW, CPG, CHANNELS_LAST)
            x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC)
            c = g * CPG + c_local
            z = pre_activation((x - shift_s) * rstd, n, c, mask, C, w_ptr, b_ptr, scale_ptr, shift_ptr,
                               HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
            y = activation(z, ACTIVATION)
            tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        rows = tl.arange(0, TILE_C)
        cols = tl.arange(0, TILE_HW)
        for c0 in range(0, CPG, TILE_C):
            c_local = c0 + rows
            c_mask = c_local < CPG
            c = g * CPG + c_local
            nc = n * C + c
            row_offs = c_local.to(tl.int64)[:, None] * HW
            for h0 in range(0, HW, TILE_HW):
                hw = h0 + cols
                mask = c_mask[:, None] & (hw < HW)[None, :]
                offs = row_offs + hw[None, :]
                x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC)
                z = (x - shift_s) * rstd
                if HAS_WEIGHT:
                    z = z * tl.load(w_ptr + c, mask=c_mask, other=0.0).to(ACC)[:, None]
                if HAS_BIAS:
                    z = z + tl.load(b_ptr + c, mask=c_mask, other=0.0).to(ACC)[:, None]
                if HAS_SCALE:
                    z = z * (1.0 + tl.load(scale_ptr + nc, mask=c_mask, other=0.0).to(ACC))[:, None]
                if HAS_SHIFT:
                    z = z + tl.load(shift_ptr + nc, mask=c_mask, other=0.0).to(ACC)[:, None]
                y = activation(z, ACTIVATION)
                tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def group_backward_kernel(
    dy_ptr,     # (N, C, *) upstream gradient, x's memory format
    x_ptr,      # (N, C, *) input, NCHW or channels-last
    dx_ptr,     # (N, C, *) input gradient out (unused without NEED_DX)
    mean_ptr,   # (N, G) mean
    rstd_ptr,   # (N, G) rstd
    w_ptr,      # (C,) weight (unused without HAS_WEIGHT)
    b_ptr,      # (C,) bias (unused without HAS_BIAS)
    scale_ptr,  # (N, C) scale (unused without HAS_SCALE)
    shift_ptr,  # (N, C) shift (unused without HAS_SHIFT)
    ka_ptr,     # (N, C) out: (1 + scale) * sum_hw dz1 xhat, ACC (unused without WRITE_PARTIALS)
    kb_ptr,     # (N, C) out: (1 + scale) * sum_hw dz1, ACC (unused without WRITE_PARTIALS)
    ds_ptr,     # (N, C) out: dscale, scale's dtype (unused without HAS_SCALE)
    dt_ptr,     # (N, C) out: dshift, shift's dtype (unused without HAS_SHIFT)
    C, HW, G,
    CPG: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_CPG: tl.constexpr, BLOCK_HW: tl.constexpr,
    NEED_DX: tl.constexpr, WRITE_PARTIALS: tl.constexpr,
):
    """Program row = n * G + g: per-channel sums over the group's tiles [CPG, BLOCK_HW],
    the group terms, dscale / dshift, the (n, c) partials of dweight / dbias, then dx over
    the group again (the math is in ``backward_kernels``)."""
    row = tl.program_id(0).to(tl.int64)
    n = row // G
    g = row % G
    j = tl.arange(0, BLOCK_CPG)
    c_mask = j < CPG
    c = g * CPG + j
    if CHANNELS_LAST:
        c_offs = j.to(tl.int64)
        hw_stride = C
        base = n * C * HW + g * CPG
    else:
        c_offs = j.to(tl.int64) * HW
        hw_stride = 1
        base = n * C * HW + g * CPG * HW
    mean = tl.load(mean_ptr + row).to(ACC)
    rstd = tl.load(rstd_ptr + row).to(ACC)
    cc = c[:, None] + tl.zeros([BLOCK_CPG, BLOCK_HW], dtype=tl.int32)
    acc1 = tl.zeros([BLOCK_CPG, BLOCK_HW], dtype=ACC)
    acc0 = tl.zeros([BLOCK_CPG, BLOCK_HW], dtype=ACC)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        offs = base + c_offs[:, None] + hw.to(tl.int64)[None, :] * hw_stride
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        xhat = (x - mean) * rstd
        if ACTIVATION != 0:
            z = pre_activation(xhat, n, cc, mask, C, w_ptr, b_ptr, scale_ptr, shift_ptr,
                               HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
            dz = dz * activation_grad(z, ACTIVATION)
        dz = tl.where(mask, dz, 0.0)
        acc1 += dz * xhat
        acc0 += dz
    a_sum = tl.sum(acc1, axis=1)   # per channel: sum dz1 xhat
    b_sum = tl.sum(acc0, axis=1)   # per channel: sum dz1
    w = tl.full([BLOCK_CPG], 1.0, ACC)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(ACC)
    nc = n * C + c
    k = tl.full([BLOCK_CPG], 1.0, ACC)
    if HAS_SCALE:
        k = 1.0 + tl.load(scale_ptr + nc, mask=c_mask, other=0.0).to(ACC)
    ka = k * a_sum
    kb = k * b_sum
    if WRITE_PARTIALS:
        tl.store(ka_ptr + nc, ka, mask=c_mask)
        tl.store(kb_ptr + nc, kb, mask=c_mask)
    if HAS_SCALE:
        bias = tl.zeros([BLOCK_CPG], dtype=ACC)
        if HAS_BIAS:
            bias = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(ACC)
        tl.store(ds_ptr + nc, (w * a_sum + bias * b_sum).to(ds_ptr.dtype.element_ty), mask=c_mask)
    if HAS_SHIFT:
        tl.store(dt_ptr + nc, b_sum.to(dt_ptr.dtype.element_ty), mask=c_mask)
    if NEED_DX:
        inv_count = 1.0 / (tl.zeros((), dtype=ACC) + CPG * HW)
        mean_dxhat = tl.sum(tl.where(c_mask, w * kb, 0.0), axis=0) * inv_count
        mean_dxhat_xhat = tl.sum(tl.where(c_mask, w * ka, 0.0), axis=0) * inv_count
        gain = (w * k)[:, None]
        for start in range(0, HW, BLOCK_HW):
            hw = start + tl.arange(0, BLOCK_HW)
            mask = c_mask[:, None] & (hw < HW)[None, :]
            offs = base + c_offs[:, None] + hw.to(tl.int64)[None, :] * hw_stride
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
            xhat = (x - mean) * rstd
            if ACTIVATION != 0:
                z = pre_activation(xhat, n, cc, mask, C, w_ptr, b_ptr, scale_ptr, shift_ptr,
                                   HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
                dz = dz * activation_grad(z, ACTIVATION)
            dx = rstd * (dz * gain - mean_dxhat - xhat * mean_dxhat_xhat)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def param_sums_kernel(
    ka_ptr,     # (N, C) (1 + scale) * sum dz1 xhat per (n, c), ACC
    kb_ptr,     # (N, C) (1 + scale) * sum dz1 per (n, c), ACC
    dw_ptr,     # (C,) out: dweight, weight's dtype (unused without HAS_WEIGHT)
    db_ptr,     # (C,) out: dbias, bias's dtype (unused without HAS_BIAS)
    N, C,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """dweight[c] = sum_n ka[n, c], dbias[c] = sum_n kb[n, c], n = 0, 1, ... in order: the
    same bits on every run (no atomics)."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    dw = tl.zeros([BLOCK], dtype=ACC)
    db = tl.zeros([BLOCK], dtype=ACC)
    for n in range(0, N):
        if HAS_WEIGHT:
            dw += tl.load(ka_ptr + n * C + c, mask=mask, other=0.0)
        if HAS_BIAS:
            db += tl.load(kb_ptr + n * C + c, mask=mask, other=0.0)
    if HAS_WEIGHT:
        tl.store(dw_ptr + c, dw.to(dw_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        tl.store(db_ptr + c, db.to(db_ptr.dtype.element_ty), mask=mask)
