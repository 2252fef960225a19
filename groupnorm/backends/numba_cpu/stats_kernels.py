"""Per-(n, g) mean and m2 = sum((x - mean)^2), deterministic for any thread count.

Stability: each fixed-size chunk is reduced with a corrected shifted two-pass while it
sits in L1: the chunk mean m~ first, then d = x - m~ summed twice, m2 = sum(d^2) -
sum(d)^2 / n and mean = m~ + sum(d) / n. The correction term removes the error of the
rounded m~ (without it a float32 mean of 1e4-sized data inflates the variance of 1e-2-sized
noise by a quarter percent). The chunk results are merged
with Chan's formula in a fixed left-to-right order. The memory is read once; the chunking
depends only on the shape, never on the number of threads, so results are bitwise equal
for 1 or 2 threads. Chunk partials are merged in float64 (a few numbers per group).

Chan merge of (n_a, mean_a, m2_a) and (n_b, mean_b, m2_b):
    n = n_a + n_b,  d = mean_b - mean_a
    mean = mean_a + d * n_b / n,   m2 = m2_a + m2_b + d^2 * n_a * n_b / n
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .elements import cast_like, load

CHUNK = 4096          # elements per partial (16 KiB of float32: stays in L1)
JIT = dict(cache=True, error_model="numpy", fastmath={"reassoc", "contract", "nsz", "arcp"})


@njit(cache=True)
def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    count = count_a + count_b
    if count_b == 0:
        return count_a, mean_a, m2_a
    delta = mean_b - mean_a
    frac = count_b / count
    return count, mean_a + delta * frac, m2_a + m2_b + delta * delta * count_a * frac


@njit(**JIT)
def chunk_moments(row, lo, hi, zero):
    """(mean, m2) of row[lo:hi] in float64, by the corrected shifted two-pass."""
    v = row[lo:hi]        # zero-based loops over a view: no index wraparound, so they vectorise
    n = v.shape[0]
    s = zero
    for i in range(n):
        s += load(v, i)
    m = s * cast_like(1.0 / n, zero)
    q = zero
    e = zero
    for i in range(n):
        d = load(v, i) - m
        q += d * d
        e += d
    e64 = np.float64(e)
    return np.float64(m) + e64 / n, max(np.float64(q) - e64 * e64 / n, 0.0)


@njit(**JIT)
def row_moments(row, zero):
    """(mean, m2) of a whole row: fixed CHUNK partials Chan-merged left to right."""
    length = row.shape[0]
    count, mean, m2 = 0.0, 0.0, 0.0
    for lo in range(0, length, CHUNK):
        hi = min(lo + CHUNK, length)
        m_k, q_k = chunk_moments(row, lo, hi, zero)
        count, mean, m2 = chan_merge(count, mean, m2, float(hi - lo), m_k, q_k)
    return mean, m2


@njit(parallel=True, **JIT)
def stats_rows(x, mean_out, m2_out, zero):
    """Contiguous groups. x: (N*G, L) with L = C/G * HW; outputs (N*G,).

    Parallel over (group, chunk) so even one group spreads over the cores; the merge is
    the same left-to-right Chan merge as row_moments, so both give identical bits.
    """
    rows, length = x.shape
    chunks = (length + CHUNK - 1) // CHUNK
    part_mean = np.empty((rows, chunks), np.float64)
    part_m2 = np.empty((rows, chunks), np.float64)
    for task in prange(rows * chunks):
        r = task // chunks
        k = task - r * chunks
        lo = k * CHUNK
        part_mean[r, k], part_m2[r, k] = chunk_moments(x[r], lo, min(lo + CHUNK, length), zero)
    for r in range(rows):                 # serial: a few numbers per group, no second fork
        count, mean, m2 = 0.0, 0.0, 0.0
        for k in range(chunks):
            n_k = min(CHUNK, length - k * CHUNK)
            count, mean, m2 = chan_merge(count, mean, m2, float(n_k), part_mean[r, k], part_m2[r, k])
        mean_out[r] = mean
        m2_out[r] = m2


@njit(**JIT)
def pixel_block_moments(block, groups, part_mean, part_m2, zero):
    """Per-group (mean, m2) of one (rows, C) channels-last block, corrected two-pass.

    A separate function, not the prange body: Numba's parallel lowering of a loop body
    keeps LLVM from vectorising it, a plain callee vectorises (about 2x here).
    """
    rows, channels = block.shape
    cpg = channels // groups
    acc = np.full(channels, zero)          # accumulation dtype (float32 or float64)
    dev = np.full(channels, zero)
    centre = np.full(channels, zero)
    for c in range(channels):
        acc[c] = 0.0
    for r in range(rows):
        row = block[r]
        for c in range(channels):
            acc[c] += load(row, c)
    inv = 1.0 / (rows * cpg)
    for g in range(groups):
        s = 0.0
        for c in range(g * cpg, (g + 1) * cpg):
            s += acc[c]
        m = cast_like(s * inv, zero)
        part_mean[g] = m
        for c in range(g * cpg, (g + 1) * cpg):
            centre[c] = m
    for c in range(channels):
        acc[c] = 0.0
        dev[c] = 0.0
    for r in range(rows):
        row = block[r]
        for c in range(channels):
            d = load(row, c) - centre[c]
            acc[c] += d * d
            dev[c] += d
    count = rows * cpg
    for g in range(groups):
        q = 0.0
        e = 0.0
        for c in range(g * cpg, (g + 1) * cpg):
            q += acc[c]
            e += dev[c]
        part_mean[g] += e / count
        part_m2[g] = max(q - e * e / count, 0.0)


@njit(parallel=True, **JIT)
def stats_channels_last(x, groups, mean_out, m2_out, zero):
    """Channels-last groups. x: (N, HW, C); outputs (N, G).

    Parallel over (n, block of HW rows): per block, per-channel sums (vectorised along
    the contiguous C axis) give the block's group means, a second sweep over the
    L1-resident block gives per-group m2; blocks are then Chan-merged in order.
    """
    n_batch, hw, channels = x.shape
    cpg = channels // groups
    block_rows = max(1, CHUNK // channels)
    blocks = (hw + block_rows - 1) // block_rows
    part_mean = np.empty((n_batch, blocks, groups), np.float64)
    part_m2 = np.empty((n_batch, blocks, groups), np.float64)
    for task in prange(n_batch * blocks):
        n = task // blocks
        k = task - n * blocks
        lo = k * block_rows
        pixel_block_moments(x[n, lo:min(lo + block_rows, hw)], groups, part_mean[n, k], part_m2[n, k], zero)
    for ng in range(n_batch * groups):    # serial merge: no second fork
        n = ng // groups
        g = ng - n * groups
        count, mean, m2 = 0.0, 0.0, 0.0
        for k in range(blocks):
            n_k = (min(block_rows, hw - k * block_rows)) * cpg
            count, mean, m2 = chan_merge(count, mean, m2, float(n_k), part_mean[n, k, g], part_m2[n, k, g])
        mean_out[n, g] = mean
        m2_out[n, g] = m2
