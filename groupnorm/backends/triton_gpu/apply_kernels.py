"""Apply kernel: normalise with given statistics, then the fused epilogue, split per group."""
from __future__ import annotations

import triton
import triton.language as tl

from .epilogue_jit import activation, group_offsets, pre_activation
from .stats_kernels import merge_partials


@triton.jit
def apply_kernel(
    x_ptr,      # (N, C, *) input, NCHW or channels-last
    y_ptr,      # (N, C, *) output, x's dtype and memory format
    mean_ptr,   # (N, G) mean (written here with MERGE)
    rstd_ptr,   # (N, G) rstd (written here with MERGE)
    w_ptr,      # (C,) weight (unused without HAS_WEIGHT)
    b_ptr,      # (C,) bias (unused without HAS_BIAS)
    scale_ptr,  # (N, C) scale (unused without HAS_SCALE)
    shift_ptr,  # (N, C) shift (unused without HAS_SHIFT)
    count_ptr,  # (N * G, SPLIT_S) partial counts (MERGE only)
    pmean_ptr,  # (N * G, SPLIT_S) partial means (MERGE only)
    pm2_ptr,    # (N * G, SPLIT_S) partial m2 (MERGE only)
    ppivot_ptr,  # (N * G, SPLIT_S) partial pivots (MERGE only)
    C, HW, G, group_size, stride_x_n, stride_x_c, CHUNK, SPLIT_S, eps,
    CPG: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    MERGE: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program (row, s) writes y = act(z1((x - mean) * rstd)) for its chunk of group ``row``.

    With MERGE the statistics come from the split-statistics partials: every program merges
    its group's partials itself (the same fixed tree, so all agree bit for bit) and program
    s = 0 writes mean and rstd. One launch fewer than a separate combine kernel, which on
    small shapes is host time saved (a Triton launch costs tens of microseconds of Python).
    """
    row = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    n = row // G
    g = row % G
    base = n * stride_x_n + g * CPG * stride_x_c
    if MERGE:
        mean, m2, k = merge_partials(count_ptr, pmean_ptr, pm2_ptr, ppivot_ptr, row, SPLIT_S, BLOCK_S)
        rstd = 1.0 / tl.sqrt(m2 / tl.maximum(k, 1.0) + eps)
        if s == 0:
            tl.store(mean_ptr + row, mean)
            tl.store(rstd_ptr + row, rstd)
    else:
        mean = tl.load(mean_ptr + row).to(ACC)
        rstd = tl.load(rstd_ptr + row).to(ACC)
    for start in range(0, CHUNK, BLOCK):
        i = s * CHUNK + start + tl.arange(0, BLOCK)
        mask = i < group_size
        offs, c_local = group_offsets(i, C, HW, CPG, CHANNELS_LAST)
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        c = g * CPG + c_local
        z = pre_activation((x - mean) * rstd, n, c, mask, C, w_ptr, b_ptr, scale_ptr, shift_ptr,
                           HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
        y = activation(z, ACTIVATION)
        tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
