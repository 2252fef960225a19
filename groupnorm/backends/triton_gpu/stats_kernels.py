"""Statistics kernels: the fused one-read forward, and the two-stage split statistics.

Shapes: x is (N, C, HW) logically, G groups of CPG = C / G channels, a group holds
CPG * HW elements; rows are the N * G groups (row = n * G + g). Statistics are in ACC
(float32, or float64 for float64 x), never E[x^2] - E[x]^2.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .epilogue_jit import activation, group_offsets, pre_activation


@triton.jit
def fused_forward_kernel(
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
    WRITE_STATS: tl.constexpr,
):
    """One program per (n, g) holds the whole group in registers: x is read once.

    Pivoted two-pass over the registers: with k = the group's first element, xs = x - k
    (exact for values near k), mean_s = sum(xs) / count and m2 = sum((xs - mean_s)^2); then
    mean = k + mean_s, rstd = 1 / sqrt(m2 / count + eps), y = act(z1(xhat)). The pivot keeps
    a large common offset (1e4 + 1e-2 * noise) out of the float32 sums.
    """
    row = tl.program_id(0).to(tl.int64)
    n = row // G
    g = row % G
    base = n * stride_x_n + g * CPG * stride_x_c
    i = tl.arange(0, BLOCK)
    mask = i < group_size
    offs, c_local = group_offsets(i, C, HW, CPG, CHANNELS_LAST)
    pivot = tl.load(x_ptr + base).to(ACC)
    xs = tl.where(mask, tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC) - pivot, 0.0)
    count = tl.zeros((), dtype=ACC) + group_size
    mean_s = tl.sum(xs, axis=0) / count
    d = tl.where(mask, xs - mean_s, 0.0)
    m2 = tl.sum(d * d, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    if WRITE_STATS:
        tl.store(mean_ptr + row, pivot + mean_s)
        tl.store(rstd_ptr + row, rstd)
    c = g * CPG + c_local
    z = pre_activation(d * rstd, n, c, mask, C, w_ptr, b_ptr, scale_ptr, shift_ptr,
                       HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
    y = activation(z, ACTIVATION)
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def stats_partial_kernel(
    x_ptr,      # (N, C, *) input, NCHW or channels-last
    count_ptr,  # (N * G, SPLIT) partial counts out, ACC
    mean_ptr,   # (N * G, SPLIT) partial means out, ACC
    m2_ptr,     # (N * G, SPLIT) partial sums of squared deviations out, ACC
    pivot_ptr,  # (N * G, SPLIT) the pivot k (the group's first element) out, ACC
    C, HW, G, group_size, stride_x_n, stride_x_c, CHUNK, SPLIT,
    CPG: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Stage 1: program (row, s) reduces elements [s * CHUNK, (s + 1) * CHUNK) of its group.

    Each lane runs Welford's update over the elements it sees (mean += (x - mean) / k,
    m2 += (x - mean_old) (x - mean_new)); the lanes are then merged with Chan's formula in
    the parallel form: mean = sum(k_l mean_l) / k, m2 = sum(m2_l + k_l (mean_l - mean)^2).
    All programs of a group work on xs = x - k, k = the group's first element, so a large
    common offset never enters the sums; the partial means are of xs, and k is stored with
    them for stage 2.
    """
    row = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    n = row // G
    g = row % G
    base = n * stride_x_n + g * CPG * stride_x_c
    pivot = tl.load(x_ptr + base).to(ACC)
    k_l = tl.zeros([BLOCK], dtype=ACC)
    mean_l = tl.zeros([BLOCK], dtype=ACC)
    m2_l = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, CHUNK, BLOCK):
        i = s * CHUNK + start + tl.arange(0, BLOCK)
        mask = i < group_size
        offs, _ = group_offsets(i, C, HW, CPG, CHANNELS_LAST)
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC) - pivot
        k_l += tl.where(mask, 1.0, 0.0).to(ACC)
        delta = x - mean_l
        mean_l += tl.where(mask, delta / tl.maximum(k_l, 1.0), 0.0)
        m2_l += tl.where(mask, delta * (x - mean_l), 0.0)
    k = tl.sum(k_l, axis=0)
    mean = tl.sum(k_l * mean_l, axis=0) / tl.maximum(k, 1.0)
    dev = mean_l - mean
    m2 = tl.sum(m2_l + k_l * dev * dev, axis=0)
    tl.store(count_ptr + row * SPLIT + s, k)
    tl.store(mean_ptr + row * SPLIT + s, mean)
    tl.store(m2_ptr + row * SPLIT + s, m2)
    tl.store(pivot_ptr + row * SPLIT + s, pivot)


@triton.jit
def merge_partials(count_ptr, pmean_ptr, pm2_ptr, ppivot_ptr, row, SPLIT, BLOCK_S: tl.constexpr):
    """Chan's merge of one group's SPLIT partials -> (mean, m2, count), in a fixed tree.

    k = sum k_s, mean = sum(k_s mean_s) / k, m2 = sum(m2_s + k_s (mean_s - mean)^2): the
    same order for a given SPLIT on every run and in every program that calls it, so the
    result is bitwise deterministic (the apply kernel calls it from each of its programs).
    """
    s = tl.arange(0, BLOCK_S)
    mask = s < SPLIT
    k_s = tl.load(count_ptr + row * SPLIT + s, mask=mask, other=0.0)
    mean_s = tl.load(pmean_ptr + row * SPLIT + s, mask=mask, other=0.0)
    m2_s = tl.load(pm2_ptr + row * SPLIT + s, mask=mask, other=0.0)
    k = tl.sum(k_s, axis=0)
    mean = tl.sum(k_s * mean_s, axis=0) / tl.maximum(k, 1.0)
    dev = mean_s - mean
    m2 = tl.sum(tl.where(mask, m2_s + k_s * dev * dev, 0.0), axis=0)
    return tl.load(ppivot_ptr + row * SPLIT) + mean, m2, k


@triton.jit
def stats_combine_kernel(
    count_ptr,     # (N * G, SPLIT) partial counts, ACC
    pmean_ptr,     # (N * G, SPLIT) partial means, ACC
    pm2_ptr,       # (N * G, SPLIT) partial m2, ACC
    ppivot_ptr,    # (N * G, SPLIT) the pivot k the partial means are relative to, ACC
    mean_ptr,      # (N * G,) mean out, ACC
    m2_ptr,        # (N * G,) m2 out, ACC (unused without WRITE_M2)
    rstd_ptr,      # (N * G,) rstd out, ACC (unused without WRITE_RSTD)
    SPLIT, eps,
    WRITE_M2: tl.constexpr, WRITE_RSTD: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Stage 2 on its own (the stats op): one program per group merges its SPLIT partials."""
    row = tl.program_id(0).to(tl.int64)
    mean, m2, k = merge_partials(count_ptr, pmean_ptr, pm2_ptr, ppivot_ptr, row, SPLIT, BLOCK_S)
    tl.store(mean_ptr + row, mean)
    if WRITE_M2:
        tl.store(m2_ptr + row, m2)
    if WRITE_RSTD:
        tl.store(rstd_ptr + row, 1.0 / tl.sqrt(m2 / tl.maximum(k, 1.0) + eps))
