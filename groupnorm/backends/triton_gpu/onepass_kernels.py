"""One-pass kernels for groups too large for one program: x (and dy) read once from memory.

Work split. A *row* is (n, span): ``SPAN_G`` whole groups of sample n (one group for NCHW;
for channels-last a span of whole groups wide enough for full 32-byte sectors, up to all
of C, so a tile is whole pixel rows [SPAN_C channels, BLOCK_HW pixels] loaded as vectors).
The SPLIT programs of a row each own a run of K tiles along HW. A program

  1. loads its tile(s) and computes per-group partial statistics (count, mean, m2),
  2. publishes them to a (N * G, SPLIT) scratch,
  3. meets the other programs of its row at a per-row barrier (PHASE 0 only),
  4. merges the row's SPLIT partials with Chan's formula in one fixed tree (every program
     of the row gets the same bits, on every run), and
  5. normalises the tile it still holds (K == 1; else re-reads it, from L2 by design).

PHASE 0 does 1-5 in one cooperative launch (all programs resident, so the barrier cannot
deadlock; the launch fails instead). PHASE 1 (steps 1-2) followed by PHASE 2 (4-5, with
its own load) is the barrier-free pair built from the same helpers: the Triton interpreter
runs programs one after another, where no barrier can complete, so CI tests the pair and
the GPU script tests PHASE 0 against it bit for bit.

Persistent waves: the grid is ROWS_PER_WAVE * SPLIT programs (what the chip holds) and
loops over ``WAVES`` waves of rows, so one launch covers any N * G. Each barrier word is
used once per launch and returns to its starting value (see ``row_barrier``), so CUDA-graph
replays need no reset.

Statistics use the group's first element as a pivot (xs = x - pivot), as the fused
kernel does, so a large common offset stays out of the float32 sums.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .epilogue_jit import activation


@triton.jit
def row_barrier(bar_ptr, first, expected):
    """Wait until ``expected`` programs have arrived at the int32 word ``bar_ptr``.

    The first program adds 2^31 - (expected - 1), the others 1: the word's sign bit flips
    exactly when all have arrived, and its low 31 bits come back to where they were, so the
    word resets itself for the next launch (or CUDA-graph replay). Release on arrival
    publishes this program's partials; acquire on the poll makes the others' visible.
    """
    tl.debug_barrier()  # every thread's partial stores precede the arrival
    if first:  # in int64, truncated: the bit pattern 0x80000000 - (expected - 1)
        inc = (2147483649 - (tl.zeros((), tl.int64) + expected)).to(tl.int32)
    else:
        inc = tl.full((), 1, tl.int32)
    old = tl.atomic_add(bar_ptr, inc, sem="release", scope="gpu")
    cur = old
    while (old ^ cur) >= 0:  # sign bit not yet flipped
        cur = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def tile_offsets(hw0, HW, SPAN_C, stride_c, stride_hw,
                 BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, WIDE: tl.constexpr):
    """Offsets [BLOCK_C, BLOCK_HW] of a tile relative to its row's first channel, and mask.

    int32 unless WIDE (a sample of >= 2^31 elements): the row base carries the int64 part.
    """
    cl = tl.arange(0, BLOCK_C)
    hw = hw0 + tl.arange(0, BLOCK_HW)
    mask = (cl < SPAN_C)[:, None] & (hw < HW)[None, :]
    if WIDE:
        offs = cl.to(tl.int64)[:, None] * stride_c + hw.to(tl.int64)[None, :] * stride_hw
    else:
        offs = cl[:, None] * stride_c + hw[None, :] * stride_hw
    return offs, mask


@triton.jit
def row_base(n, sp, stride_n, stride_c, SPAN_C):
    """int64 element offset of row (n, span sp)'s first channel at pixel 0."""
    return n * stride_n + (sp * SPAN_C).to(tl.int64) * stride_c


@triton.jit
def groups_to_channels(v, onehot):
    """[BLOCK_G] per-group values -> [BLOCK_C] per-channel values (exact: one term each)."""
    return tl.sum(tl.where(onehot, v[:, None], 0.0), axis=0)


@triton.jit
def channels_to_groups(v, onehot):
    """[BLOCK_C] per-channel sums -> [BLOCK_G] per-group sums, in a fixed order."""
    return tl.sum(tl.where(onehot, v[None, :], 0.0), axis=1)


@triton.jit
def tile_partials(xs, mask, n_valid, onehot, CPG: tl.constexpr):
    """(count, mean, m2) per group of one tile of pivoted values xs (0 where masked).

    Two passes over registers: the tile's group means, then squared deviations from them.
    """
    cnt = (n_valid * CPG).to(xs.dtype)
    mean = channels_to_groups(tl.sum(xs, axis=1), onehot) / tl.maximum(cnt, 1.0)
    d = tl.where(mask, xs - groups_to_channels(mean, onehot)[:, None], 0.0)
    m2 = channels_to_groups(tl.sum(d * d, axis=1), onehot)
    return cnt + tl.zeros_like(mean), mean, m2


@triton.jit
def chan_combine(na, ma, m2a, nb, mb, m2b):
    """Chan's pairwise merge of two (count, mean, m2) statistics."""
    n = na + nb
    d = mb - ma
    f = nb / tl.maximum(n, 1.0)
    return n, ma + d * f, m2a + m2b + d * d * na * f


@triton.jit
def merge_row(part_ptr, part_stride, grows, gmask, SPLIT, BLOCK_G: tl.constexpr, MERGE_S: tl.constexpr):
    """Merge the SPLIT partials of groups ``grows`` ([BLOCK_G] rows of the (N * G, SPLIT)
    scratch), MERGE_S partials at a time (bounded registers): per chunk count = sum k_s,
    mean = sum(k_s mean_s) / count, m2 = sum(m2_s + k_s (mean_s - mean)^2), chunks then
    merged in order with Chan's formula. One fixed order for a given SPLIT and MERGE_S:
    every caller gets the same bits. Loads bypass L1 (.cg): other SMs wrote the partials
    during this launch.
    """
    k = tl.zeros([BLOCK_G], part_ptr.dtype.element_ty)
    mean = tl.zeros([BLOCK_G], part_ptr.dtype.element_ty)
    m2 = tl.zeros([BLOCK_G], part_ptr.dtype.element_ty)
    for s0 in range(0, SPLIT, MERGE_S):
        s = s0 + tl.arange(0, MERGE_S)
        m = gmask[:, None] & (s < SPLIT)[None, :]
        p = part_ptr + grows[:, None] * SPLIT + s[None, :]
        k_s = tl.load(p, mask=m, other=0.0, cache_modifier=".cg")
        mean_s = tl.load(p + part_stride, mask=m, other=0.0, cache_modifier=".cg")
        m2_s = tl.load(p + 2 * part_stride, mask=m, other=0.0, cache_modifier=".cg")
        kc = tl.sum(k_s, axis=1)
        mc = tl.sum(k_s * mean_s, axis=1) / tl.maximum(kc, 1.0)
        dev = mean_s - mc[:, None]
        m2c = tl.sum(tl.where(m, m2_s + k_s * dev * dev, 0.0), axis=1)
        k, mean, m2 = chan_combine(k, mean, m2, kc, mc, m2c)
    return k, mean, m2


@triton.jit
def channel_affine(n, c, cmask, C, w_ptr, b_ptr, scale_ptr, shift_ptr, ACC: tl.constexpr,
                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """Per-channel (a, b) with z1 = xhat * a + b, a = w (1 + scale), b = b (1 + scale) + shift."""
    a = tl.full(c.shape, 1.0, ACC)
    bb = tl.zeros(c.shape, ACC)
    if HAS_WEIGHT:
        a = tl.load(w_ptr + c, mask=cmask, other=0.0).to(ACC)
    if HAS_BIAS:
        bb = tl.load(b_ptr + c, mask=cmask, other=0.0).to(ACC)
    if HAS_SCALE:
        k = 1.0 + tl.load(scale_ptr + n * C + c, mask=cmask, other=0.0).to(ACC)
        a = a * k
        bb = bb * k
    if HAS_SHIFT:
        bb = bb + tl.load(shift_ptr + n * C + c, mask=cmask, other=0.0).to(ACC)
    return a, bb


@triton.jit
def _row_groups(row, NSPAN, G, CPG: tl.constexpr, SPAN_G: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr):
    """Row -> (n, span, rows of its groups in (N * G) arrays, group mask, channel->group
    one-hot [BLOCK_G, BLOCK_C], span-relative channels, channel mask)."""
    n = (row // NSPAN).to(tl.int64)
    sp = row % NSPAN
    j = tl.arange(0, BLOCK_G)
    gmask = j < SPAN_G
    grows = n * G + sp * SPAN_G + j
    cl = tl.arange(0, BLOCK_C)
    cmask = cl < SPAN_G * CPG
    onehot = ((cl // CPG)[None, :] == j[:, None]) & cmask[None, :]
    return n, sp, grows, gmask, onehot, cl, cmask


@triton.jit
def _forward_row(
    row, s, x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, part_ptr, bar_ptr,
    C, HW, G, NSPAN, stride_n, stride_c, stride_hw, SPLIT, part_stride, eps,
    CPG: tl.constexpr, SPAN_G: tl.constexpr, K: tl.constexpr, PHASE: tl.constexpr, WIDE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_G: tl.constexpr, MERGE_S: tl.constexpr,
):
    SPAN_C = SPAN_G * CPG
    n, sp, grows, gmask, onehot, cl, cmask = _row_groups(row, NSPAN, G, CPG, SPAN_G, BLOCK_C, BLOCK_G)
    base = row_base(n, sp, stride_n, stride_c, SPAN_C)
    # The pivot of each group: its first element (channel g * CPG, pixel 0).
    pivot_g = tl.load(x_ptr + base + (tl.arange(0, BLOCK_G) * CPG).to(tl.int64) * stride_c,
                      mask=gmask, other=0.0).to(ACC)
    pivot = groups_to_channels(pivot_g, onehot)[:, None]
    hw_first = s * (K * BLOCK_HW)
    if K == 1:  # the tile stays in registers across the barrier
        offs, mask = tile_offsets(hw_first, HW, SPAN_C, stride_c, stride_hw, BLOCK_C, BLOCK_HW, WIDE)
        xr = tl.load(x_ptr + base + offs, mask=mask, other=0.0)
        if PHASE != 2:
            n_valid = tl.minimum(tl.maximum(HW - hw_first, 0), BLOCK_HW)
            cnt, mean, m2 = tile_partials(tl.where(mask, xr.to(ACC) - pivot, 0.0), mask, n_valid, onehot, CPG)
    else:  # streamed: K tiles merged in order; applied after a second read (L2 by plan)
        if PHASE != 2:
            cnt = tl.zeros([BLOCK_G], ACC)
            mean = tl.zeros([BLOCK_G], ACC)
            m2 = tl.zeros([BLOCK_G], ACC)
            for t in range(0, K):
                hw0 = hw_first + t * BLOCK_HW
                offs, mask = tile_offsets(hw0, HW, SPAN_C, stride_c, stride_hw, BLOCK_C, BLOCK_HW, WIDE)
                xs = tl.where(mask, tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC) - pivot, 0.0)
                n_valid = tl.minimum(tl.maximum(HW - hw0, 0), BLOCK_HW)
                tc, tm, tm2 = tile_partials(xs, mask, n_valid, onehot, CPG)
                cnt, mean, m2 = chan_combine(cnt, mean, m2, tc, tm, tm2)
    if PHASE != 2:
        p = part_ptr + grows * SPLIT + s
        tl.store(p, cnt, mask=gmask)
        tl.store(p + part_stride, mean, mask=gmask)
        tl.store(p + 2 * part_stride, m2, mask=gmask)
    if PHASE == 0:
        row_barrier(bar_ptr + row, s == 0, SPLIT)
    if PHASE != 1:
        k, mean_s, m2_all = merge_row(part_ptr, part_stride, grows, gmask, SPLIT, BLOCK_G, MERGE_S)
        rstd_g = 1.0 / tl.sqrt(m2_all / tl.maximum(k, 1.0) + eps)
        if s == 0:
            tl.store(mean_ptr + grows, pivot_g + mean_s, mask=gmask)
            tl.store(rstd_ptr + grows, rstd_g, mask=gmask)
        c = sp * SPAN_C + cl
        a, bb = channel_affine(n, c, cmask, C, w_ptr, b_ptr, scale_ptr, shift_ptr, ACC,
                               HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
        # z1 = (xs - mean) * rstd * a + b = xs * pa + pb: one multiply-add per element.
        pa = groups_to_channels(rstd_g, onehot) * a
        pb = (bb - groups_to_channels(mean_s, onehot) * pa)[:, None]
        pa = pa[:, None]
        if K == 1:
            y = activation((xr.to(ACC) - pivot) * pa + pb, ACTIVATION)
            tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            for t in range(0, K):
                hw0 = hw_first + t * BLOCK_HW
                offs, mask = tile_offsets(hw0, HW, SPAN_C, stride_c, stride_hw, BLOCK_C, BLOCK_HW, WIDE)
                xs = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC) - pivot
                y = activation(xs * pa + pb, ACTIVATION)
                tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def onepass_forward_kernel(
    x_ptr,      # (N, C, *) input, NCHW or channels-last
    y_ptr,      # (N, C, *) output, x's dtype and memory format
    w_ptr, b_ptr,               # (C,) weight, bias (unused without HAS_WEIGHT / HAS_BIAS)
    scale_ptr, shift_ptr,       # (N, C) scale, shift (unused without HAS_SCALE / HAS_SHIFT)
    mean_ptr, rstd_ptr,         # (N, G) statistics out, ACC
    part_ptr,   # (3, N * G, SPLIT) scratch: partial count, mean, m2 (ACC)
    bar_ptr,    # (ROWS,) int32 barrier words (PHASE 0 only), zero at first use
    C, HW, G, NSPAN, stride_n, stride_c, stride_hw, ROWS, SPLIT, WAVES, part_stride, eps,
    CPG: tl.constexpr, SPAN_G: tl.constexpr, K: tl.constexpr, PHASE: tl.constexpr, WIDE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_G: tl.constexpr, MERGE_S: tl.constexpr,
):
    """Forward y = act(z1(xhat)), mean, rstd; see the module docstring for PHASE and waves."""
    pid = tl.program_id(0)
    rows_per_wave = tl.num_programs(0) // SPLIT
    local = pid // SPLIT
    s = pid % SPLIT
    for wave in range(0, WAVES):
        row = wave * rows_per_wave + local
        if row < ROWS:
            _forward_row(row, s, x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
                         part_ptr, bar_ptr, C, HW, G, NSPAN, stride_n, stride_c, stride_hw, SPLIT,
                         part_stride, eps, CPG, SPAN_G, K, PHASE, WIDE,
                         HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT, ACTIVATION, ACC,
                         BLOCK_C, BLOCK_HW, BLOCK_G, MERGE_S)
