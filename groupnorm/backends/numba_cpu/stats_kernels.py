"""Per-(n, g) mean and m2 = sum((x - mean)^2), deterministic for any thread count.

Stability: a row's first fixed-size chunk is reduced with a corrected shifted two-pass
while it sits in L1: the chunk mean m~ first, then d = x - m~ summed twice, m2 = sum(d^2) -
sum(d)^2 / n and mean = m~ + sum(d) / n. The correction term removes the error of the
rounded m~ (without it a float32 mean of 1e4-sized data inflates the variance of 1e-2-sized
noise by a quarter percent). The row's other chunks take one pass of the same sums around
that first mean (one read less per element: 3-5% of a float32 forward, 10-13% of a
bfloat16 one); their cancellation grows with the distance of their mean from it, a spread
the row's m2 itself contains, so the relative error stays at float32 rounding
(tests/test_numba_backend.py, chunks with far-apart means). The chunk results are merged
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
from .function_attributes import out_of_line
from .lanes import LANES, lanes_of, total
from .pixel_tasks import task_pixels, thread_run

CHUNK = 4096          # elements per partial (16 KiB of float32: stays in L1)
JIT = dict(cache=True, error_model="numpy", fastmath={"nsz"})
# Every callee states its fastmath flags: Numba compiles a callee that states none with its
# caller's flags, so one helper would round differently under different callers. No
# function reassociates: the sums run in lanes (lanes.py), an order written into the code.


@njit(**JIT)
def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    count = count_a + count_b
    if count_b == 0:
        return count_a, mean_a, m2_a
    delta = mean_b - mean_a
    frac = count_b / count
    return count, mean_a + delta * frac, m2_a + m2_b + delta * delta * count_a * frac


@out_of_line
@njit(**JIT)
def shifted_chunk_moments(row, lo, hi, shift, zero):
    """(mean, m2) of row[lo:hi] in float64 from one pass of sums of d = x - shift, shift
    a nearby mean in the accumulation dtype: the chunk's own (chunk_moments' second pass)
    or the row's first chunk mean (the row's other chunks: one read instead of two). The
    cancellation in sum(d^2) - sum(d)^2 / n grows with (chunk mean - shift)^2, a spread
    the row's own m2 contains (Chan's merge adds it), so it stays small relative to the
    result; sum(d) also corrects the rounding of shift in the mean. Sums in lanes."""
    v = row[lo:hi]
    n = v.shape[0]
    s = lanes_of(zero)
    q = lanes_of(zero)
    full = n - n % LANES
    for i in range(0, full, LANES):
        for j in range(LANES):
            d = load(v, i + j) - shift
            s[j] += d
            q[j] += d * d
    if full < n:   # the partial block: masked lanes add exact zeros (unsigned: no gathers)
        tail = np.uint64(full)
        for j in range(LANES):
            d = load(v, tail + np.uint64(j)) - shift if full + j < n else zero
            s[j] += d
            q[j] += d * d
    s64 = np.float64(total(s))
    return np.float64(shift) + s64 / n, max(np.float64(total(q)) - s64 * s64 / n, 0.0)


@out_of_line
@njit(**JIT)
def chunk_moments(row, lo, hi, zero):
    """(mean, m2) of row[lo:hi] in float64, by the corrected shifted two-pass."""
    v = row[lo:hi]        # zero-based loops over a view: no index wraparound, so they vectorise
    n = v.shape[0]
    s = lanes_of(zero)
    full = n - n % LANES
    for i in range(0, full, LANES):
        for j in range(LANES):
            s[j] += load(v, i + j)
    if full < n:
        tail = np.uint64(full)
        for j in range(LANES):
            s[j] += load(v, tail + np.uint64(j)) if full + j < n else zero
    return shifted_chunk_moments(row, lo, hi, total(s) * cast_like(1.0 / n, zero), zero)   # d = x - m~


@njit(**JIT)
def row_moments(row, zero):
    """(mean, m2) of a whole row: the first CHUNK by the corrected two-pass, the others
    by one shifted pass around its mean; fixed CHUNK partials Chan-merged left to right."""
    length = row.shape[0]
    first = min(CHUNK, length)
    mean, m2 = chunk_moments(row, 0, first, zero)
    count = float(first)
    shift = cast_like(mean, zero)
    for lo in range(CHUNK, length, CHUNK):
        hi = min(lo + CHUNK, length)
        m_k, q_k = shifted_chunk_moments(row, lo, hi, shift, zero)
        count, mean, m2 = chan_merge(count, mean, m2, float(hi - lo), m_k, q_k)
    return mean, m2


@njit(parallel=True, **JIT)
def stats_rows(x, mean_out, m2_out, zero):
    """Contiguous groups. x: (N*G, L) with L = C/G * HW; outputs (N*G,).

    Parallel over (group, chunk) so even one group spreads over the cores (first chunks
    first: they give the others' shifts); the partials and the left-to-right Chan merge
    are row_moments', so both give identical bits.
    """
    rows, length = x.shape
    chunks = (length + CHUNK - 1) // CHUNK
    part_mean = np.empty((rows, chunks), np.float64)
    part_m2 = np.empty((rows, chunks), np.float64)
    for r in prange(rows):                # first chunks: the shifts of the others
        part_mean[r, 0], part_m2[r, 0] = chunk_moments(x[r], 0, min(CHUNK, length), zero)
    if chunks > 1:
        for task in prange(rows * (chunks - 1)):
            r = task // (chunks - 1)
            k = task - r * (chunks - 1) + 1
            lo = k * CHUNK
            part_mean[r, k], part_m2[r, k] = shifted_chunk_moments(
                x[r], lo, min(lo + CHUNK, length), cast_like(part_mean[r, 0], zero), zero)
    for r in range(rows):                 # serial: a few numbers per group, no third fork
        count, mean, m2 = 0.0, 0.0, 0.0
        for k in range(chunks):
            n_k = min(CHUNK, length - k * CHUNK)
            count, mean, m2 = chan_merge(count, mean, m2, float(n_k), part_mean[r, k], part_m2[r, k])
        mean_out[r] = mean
        m2_out[r] = m2


JIT_CL = dict(cache=True, error_model="numpy", boundscheck=False, fastmath={"nsz"})
BLOCK_ELEMS = 32768   # channels-last: target elements per float32 run of shifted sums ...
BLOCK_ROWS_MIN = 32   # ... but at least this many pixels (per-channel merge cost) ...
BLOCK_ROWS_MAX = 256  # ... and at most this many (float32 shifted sums stay accurate)
TASK_ELEMS = 262144   # channels-last: at most this many elements per task (whole runs) ...
TASK_BLOCKS_MIN = 4   # ... while a sample still splits into this many tasks
ROWS_TOGETHER_MAX_BYTES = 8 << 20   # four pixels per accumulator update up to this size of a sample


@njit(cache=True, error_model="numpy", fastmath=False)
def pixel_block_rows(channels):
    """Pixels per float32 run of channels-last shifted sums: a function of C only."""
    return min(BLOCK_ROWS_MAX, max(BLOCK_ROWS_MIN, BLOCK_ELEMS // channels))


@njit(cache=True, error_model="numpy", fastmath=False)
def pixel_task_rows(hw, channels):
    """Pixels per channels-last statistics task, whole runs: a function of the shape
    only (determinism). Large tasks (each costs a fork share, scratch setup and a
    per-channel to per-group conversion), but at least TASK_BLOCKS_MIN per sample where
    HW allows, so a small sample still spreads over the threads."""
    run = pixel_block_rows(channels)
    return run * max(1, min(TASK_ELEMS // (run * channels), hw // (run * TASK_BLOCKS_MIN)))


@njit(**JIT_CL)
def shifted_channel_sums(x, n, lo, hi, t, s, q, shift, together):
    """Per channel c over pixels lo..hi-1 of sample n of x (N, HW, C), with
    d = x - shift[t, c]: s[t, c] = sum d and q[t, c] = sum d^2.

    The inner loops run over the contiguous C axis with one independent accumulator per
    channel, so they vectorise without reassociation. together = 4 adds four pixels per
    accumulator load/store (the loads and stores of s and q bound the loop while x is in
    cache); together = 1 streams one pixel at a time (four interleaved pixel streams
    measured up to 1.6x slower when x comes from DRAM). Whole arrays and indices, no
    views: a view inside a parallel task costs atomic reference-count updates.
    """
    channels = x.shape[2]
    for c in range(channels):
        s[t, c] = 0.0
        q[t, c] = 0.0
    r = lo
    if together == 4:
        while r + 4 <= hi:
            for c in range(channels):
                h = shift[t, c]
                d0 = load(x, (n, r, c)) - h
                d1 = load(x, (n, r + 1, c)) - h
                d2 = load(x, (n, r + 2, c)) - h
                d3 = load(x, (n, r + 3, c)) - h
                s[t, c] += (d0 + d1) + (d2 + d3)
                q[t, c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            r += 4
    while r < hi:
        for c in range(channels):
            d = load(x, (n, r, c)) - shift[t, c]
            s[t, c] += d
            q[t, c] += d * d
        r += 1


@out_of_line
@njit(cache=True, error_model="numpy", boundscheck=False, fastmath={"nsz"})
def channel_sums_to_groups(s, q, shift, rows, groups, part_mean, part_m2):
    """Exact per-group (mean, m2) from per-channel shifted sums, in float64.

    Channel c: mean_c = shift_c + s_c / rows, m2_c = q_c - s_c^2 / rows. Channels of a group
    have equal counts, so mean_g = average of mean_c and
    m2_g = sum(m2_c) + rows * sum((mean_c - mean_g)^2).
    The two sums over a group's channels run in lanes (vectorised, a fixed order): as
    one serial add chain they cost as much as a 32-pixel task's element loop at C = 1280.
    """
    channels = s.shape[0]
    cpg = channels // groups
    inv = 1.0 / rows
    full = cpg - cpg % LANES
    for g in range(groups):
        base = g * cpg
        tail = np.uint64(base + full)   # unsigned: masked loads, not gathers
        tot = lanes_of(0.0)
        for i in range(0, full, LANES):
            for j in range(LANES):
                c = base + i + j
                tot[j] += np.float64(shift[c]) + np.float64(s[c]) * inv
        if full < cpg:
            for j in range(LANES):
                c = tail + np.uint64(j)
                tot[j] += np.float64(shift[c]) + np.float64(s[c]) * inv if full + j < cpg else 0.0
        mg = total(tot) / cpg
        m2 = lanes_of(0.0)
        for i in range(0, full, LANES):
            for j in range(LANES):
                c = base + i + j
                m2[j] += channel_m2(s[c], q[c], shift[c], inv, rows, mg)
        if full < cpg:
            for j in range(LANES):
                c = tail + np.uint64(j)
                m2[j] += channel_m2(s[c], q[c], shift[c], inv, rows, mg) if full + j < cpg else 0.0
        part_mean[g] = mg
        part_m2[g] = total(m2)


@njit(cache=True, error_model="numpy", boundscheck=False, fastmath={"nsz"})
def channel_m2(s_c, q_c, shift_c, inv, rows, mean_g):
    """A channel's share of its group's m2: its own m2 plus rows * (mean_c - mean_g)^2."""
    sc = np.float64(s_c)
    dm = np.float64(shift_c) + sc * inv - mean_g
    return max(np.float64(q_c) - sc * sc * inv, 0.0) + rows * dm * dm



@njit(**JIT_CL)
def pixel_task_moments(x, n, k, lo, hi, t, s, q, shift, s64, q64, groups, part_mean, part_m2):
    """Per-group (mean, m2) of pixels lo..hi-1 of sample n into part_*[n, k]; scratch row t.

    Shift = the task's first pixel; float32 (accumulation dtype) sums over runs of
    pixel_block_rows pixels, added into float64 per-channel totals, then combined exactly
    per group. A plain callee, not the prange body: Numba's parallel lowering of a loop
    body keeps LLVM from vectorising it.
    """
    channels = x.shape[2]
    run = pixel_block_rows(channels)
    # A sample's size, not x's: the choice changes the order of the sums, and a sample's
    # bits must not depend on what else is in the batch.
    together = 4 if x.shape[1] * channels * x.itemsize <= ROWS_TOGETHER_MAX_BYTES else 1
    for c in range(channels):
        shift[t, c] = load(x, (n, lo, c))
        s64[t, c] = 0.0
        q64[t, c] = 0.0
    for a in range(lo, hi, run):
        shifted_channel_sums(x, n, a, min(a + run, hi), t, s, q, shift, together)
        for c in range(channels):
            s64[t, c] += s[t, c]
            q64[t, c] += q[t, c]
    channel_sums_to_groups(s64[t], q64[t], shift[t], hi - lo, groups, part_mean[n, k],
                           part_m2[n, k])


@njit(**JIT)
def merge_pixel_blocks(part_mean, part_m2, n, block_rows, hw, cpg, mean_out, m2_out):
    """Sample n's block partials Chan-merged in block order into mean_out[n], m2_out[n]."""
    blocks = part_mean.shape[1]
    groups = part_mean.shape[2]
    for g in range(groups):
        count, mean, m2 = 0.0, 0.0, 0.0
        for k in range(blocks):
            n_k = (min(block_rows, hw - k * block_rows)) * cpg
            count, mean, m2 = chan_merge(count, mean, m2, float(n_k), part_mean[n, k, g], part_m2[n, k, g])
        mean_out[n, g] = mean
        m2_out[n, g] = m2


@njit(**JIT_CL)
def pixel_task_run(x, first, end, blocks, block_rows, s, q, shift, s64, q64, groups, part_mean, part_m2):
    """Tasks first..end-1 of stats_channels_last, in order (one thread's run)."""
    for task in range(first, end):
        n, lo, hi = task_pixels(task, blocks, block_rows, x.shape[1])
        pixel_task_moments(x, n, task - n * blocks, lo, hi, task, s, q, shift, s64, q64, groups, part_mean,
                           part_m2)


@njit(parallel=True, **JIT)
def stats_channels_last(x, groups, mean_out, m2_out, zero, threads):
    """Channels-last groups. x: (N, HW, C); outputs (N, G).

    Parallel over (n, block of pixels), the blocking a function of the shape only: per
    block, per-channel sums of x minus a per-channel shift in one vectorised pass,
    combined exactly into per-group (mean, m2); blocks are then Chan-merged in order.
    The tasks run in ``threads`` contiguous runs (thread_run), so an apply that follows
    can walk each run backwards (apply_kernels.apply_after_stats). Scratch is allocated
    once here, not per task (a heap allocation per task costs as much as a small
    block's work).
    """
    n_batch, hw, channels = x.shape
    block_rows = pixel_task_rows(hw, channels)
    blocks = (hw + block_rows - 1) // block_rows
    tasks = n_batch * blocks
    part_mean = np.empty((n_batch, blocks, groups), np.float64)
    part_m2 = np.empty((n_batch, blocks, groups), np.float64)
    s = np.empty((tasks, channels), mean_out.dtype)   # accumulation dtype
    q = np.empty((tasks, channels), mean_out.dtype)
    shift = np.empty((tasks, channels), mean_out.dtype)
    s64 = np.empty((tasks, channels), np.float64)
    q64 = np.empty((tasks, channels), np.float64)
    for t in prange(threads):
        first, end = thread_run(tasks, threads, t)
        pixel_task_run(x, first, end, blocks, block_rows, s, q, shift, s64, q64, groups, part_mean, part_m2)
    for n in range(n_batch):    # serial merge: no second fork
        merge_pixel_blocks(part_mean, part_m2, n, block_rows, hw, channels // groups, mean_out, m2_out)
