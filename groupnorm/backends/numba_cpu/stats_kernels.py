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


JIT_CL = dict(cache=True, error_model="numpy", boundscheck=False)
BLOCK_ELEMS = 32768   # channels-last: target elements per (n, pixel-block) task
BLOCK_ROWS_MIN = 32   # ... but at least this many pixels (per-channel merge cost) ...
BLOCK_ROWS_MAX = 256  # ... and at most this many (float32 shifted sums stay accurate)


@njit(cache=True)
def pixel_block_rows(channels):
    """Pixels per channels-last statistics task: a function of C only (determinism)."""
    return min(BLOCK_ROWS_MAX, max(BLOCK_ROWS_MIN, BLOCK_ELEMS // channels))


@njit(**JIT_CL)
def shifted_channel_sums(xn, lo, hi, s, q, shift):
    """Per channel c over pixels lo..hi-1 of xn (HW, C): shift[c] = x[lo, c], s[c] = sum d,
    q[c] = sum d^2 with d = x - shift[c].

    One straight pass; the inner loop runs over the contiguous C axis with one
    independent accumulator per channel, so it vectorises without reassociation.
    """
    channels = xn.shape[1]
    first = xn[lo]
    for c in range(channels):
        shift[c] = load(first, c)
        s[c] = 0.0
        q[c] = 0.0
    for r in range(lo + 1, hi):
        for c in range(channels):        # 2-D indexing: no per-row views
            d = load(xn, (r, c)) - shift[c]
            s[c] += d
            q[c] += d * d


@njit(**JIT_CL)
def channel_sums_to_groups(s, q, shift, rows, groups, part_mean, part_m2):
    """Exact per-group (mean, m2) from per-channel shifted sums, in float64.

    Channel c: mean_c = shift_c + s_c / rows, m2_c = q_c - s_c^2 / rows. Channels of a group
    have equal counts, so mean_g = average of mean_c and
    m2_g = sum(m2_c) + rows * sum((mean_c - mean_g)^2).
    """
    channels = s.shape[0]
    cpg = channels // groups
    inv = 1.0 / rows
    for g in range(groups):
        tot = 0.0
        for c in range(g * cpg, (g + 1) * cpg):
            tot += np.float64(shift[c]) + np.float64(s[c]) * inv
        mg = tot / cpg
        m2 = 0.0
        for c in range(g * cpg, (g + 1) * cpg):
            sc = np.float64(s[c])
            dm = np.float64(shift[c]) + sc * inv - mg
            m2 += max(np.float64(q[c]) - sc * sc * inv, 0.0) + rows * dm * dm
        part_mean[g] = mg
        part_m2[g] = m2


@njit(**JIT_CL)
def pixel_block_moments(xn, lo, hi, groups, part_mean, part_m2, zero):
    """Per-group (mean, m2) of pixels lo..hi-1 of one sample xn (HW, C).

    A separate function, not the prange body: Numba's parallel lowering of a loop body
    keeps LLVM from vectorising it, a plain callee vectorises.
    """
    channels = xn.shape[1]
    s = np.full(channels, zero)          # accumulation dtype (float32 or float64)
    q = np.full(channels, zero)
    shift = np.full(channels, zero)
    shifted_channel_sums(xn, lo, hi, s, q, shift)
    channel_sums_to_groups(s, q, shift, hi - lo, groups, part_mean, part_m2)


@njit(parallel=True, **JIT)
def stats_channels_last(x, groups, mean_out, m2_out, zero):
    """Channels-last groups. x: (N, HW, C); outputs (N, G).

    Parallel over (n, block of pixels), the blocking a function of the shape only: per
    block, per-channel sums of x minus a per-channel shift (the block's first pixel) in one
    vectorised pass, combined exactly into per-group (mean, m2); blocks are then
    Chan-merged in order.
    """
    n_batch, hw, channels = x.shape
    cpg = channels // groups
    block_rows = pixel_block_rows(channels)
    blocks = (hw + block_rows - 1) // block_rows
    part_mean = np.empty((n_batch, blocks, groups), np.float64)
    part_m2 = np.empty((n_batch, blocks, groups), np.float64)
    for task in prange(n_batch * blocks):
        n = task // blocks
        k = task - n * blocks
        lo = k * block_rows
        pixel_block_moments(x[n], lo, min(lo + block_rows, hw), groups, part_mean[n, k],
                            part_m2[n, k], zero)
    for ng in range(n_batch * groups):    # serial merge: no second fork
        n = ng // groups
        g = ng - n * groups
        count, mean, m2 = 0.0, 0.0, 0.0
        for k in range(blocks):
            n_k = (min(block_rows, hw - k * block_rows)) * cpg
            count, mean, m2 = chan_merge(count, mean, m2, float(n_k), part_mean[n, k, g], part_m2[n, k, g])
        mean_out[n, g] = mean
        m2_out[n, g] = m2
