"""The whole forward in one compiled call: statistics, rstd, coefficients, apply.

One dispatch instead of four keeps the Python overhead off small shapes. With enough
groups (N*G >= GROUP_TASKS_MIN) the contiguous forward is a single parallel region of
per-group tasks: statistics, then the apply while the group is still warm in cache
(small groups a block at a time: groups_run), and one fork/join instead of two (each
fork/join costs microseconds, or a whole scheduler slice on a busy machine). Statistics
are bitwise the same as stats_rows computes.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .apply_kernels import (BLOCK, STREAM_SPAN, apply_after_stats, apply_pixels, apply_rows, apply_span,
                            apply_span_streamed, stream_scratch)
from .coefs import z1_coefs, z1_coefs_sample
from .activations import NONE
from .elements import cast_like, load
from .fast_store import store_out as store
from .function_attributes import elementwise
from .pixel_tasks import activation_scratch, thread_run
from .streaming import store_fence
from .stats_kernels import (merge_pixel_blocks, pixel_task_moments, pixel_task_rows, row_moments,
                            stats_channels_last, stats_rows)

JIT = dict(cache=True, error_model="numpy", fastmath=False)   # stated: see stats_kernels.JIT
GROUP_TASKS_MIN = 8       # per-group tasks balance over the cores from this many groups
GROUP_BLOCK_ELEMS = 16384  # contiguous: groups whose statistics go before their applies (groups_run)
SAMPLE_TASK_MAX = 1 << 18  # channels-last: per-sample forward tasks up to this many elements


@njit(**JIT)
def rstd_from_m2(m2, count, eps, rstd):
    """rstd = 1 / sqrt(m2 / count + eps) (biased variance, eps inside the root)."""
    inv_count = 1.0 / max(count, 1)
    for i in range(m2.size):
        rstd.flat[i] = 1.0 / np.sqrt(np.float64(m2.flat[i]) * inv_count + eps)


@njit(**JIT)
def forward_rows(x_groups, x_rows, y_rows, weight, bias, scale, shift, eps, act, zero, mean, rstd, stream):
    """Contiguous layout. x_groups: (N*G, C/G*HW) and x_rows/y_rows: (N*C, HW) views of
    the same memory; mean, rstd: (N, G) outputs; stream: None, or True to write y with
    streaming stores (as for every forward here; see streaming)."""
    n_batch, groups = mean.shape
    channels = x_rows.shape[0] // n_batch
    m2 = np.empty(mean.shape, np.float64)   # float64, as groups_stats keeps it: same rstd bits
    stats_rows(x_groups, mean.reshape(n_batch * groups), m2.reshape(n_batch * groups), zero)
    rstd_from_m2(m2, x_groups.shape[1], eps, rstd)
    mean_c, _, a, b = z1_coefs(mean, rstd, weight, bias, scale, shift, channels)
    rows = n_batch * channels
    apply_rows(x_rows, y_rows, mean_c.reshape(rows), a.reshape(rows), b.reshape(rows), act, stream)


def channels_last_per_sample(n_batch: int, sample_elements: int, threads: int) -> bool:
    """Which channels-last forward runs: forward_samples (True) or forward_pixel_blocks.

    Small samples (at most SAMPLE_TASK_MAX elements) and at least as many samples as
    threads: one task per sample (forward_samples), one fork/join instead of two and the
    apply reads a sample from the cache its statistics pass filled (measured 15-25%
    faster up to 2^18 elements, slower from about 3 * 2^17 on: one thread then streams a
    whole sample alone). Otherwise statistics over (n, pixel block) tasks, then the
    apply. Both paths form the same block partials and merge them in the same order,
    so the choice (the only thing the thread count decides) never changes a bit of the
    result. Plain Python: a compiled function that asks for the thread count cannot be
    cached. threads: what threads.sync_with_torch set for this call (asking Numba again
    costs ~1.2 us).
    """
    return sample_elements <= SAMPLE_TASK_MAX and n_batch >= threads


@njit(**JIT)
def forward_pixel_blocks(x, y, weight, bias, scale, shift, eps, act, zero, mean, rstd, stream, threads):
    """Channels-last, two parallel stages: statistics, then the apply, over the same
    per-thread runs of pixel blocks, the apply walking them backwards (thread_run)."""
    n_batch, hw, channels = x.shape
    groups = mean.shape[1]
    m2 = np.empty(mean.shape, np.float64)   # float64, as groups_stats keeps it: same rstd bits
    stats_channels_last(x, groups, mean, m2, zero, threads)
    rstd_from_m2(m2, hw * (channels // groups), eps, rstd)
    mean_c, _, a, b = z1_coefs(mean, rstd, weight, bias, scale, shift, channels)
    apply_after_stats(x, y, mean_c, a, b, act, stream, pixel_task_rows(hw, channels), threads)


@njit(parallel=True, **JIT)
def forward_samples(x, y, weight, bias, scale, shift, eps, act, mean, rstd):
    """Channels-last, one task per sample: its statistics, coefficients and apply. Small
    samples only (channels_last_per_sample), so y is never streamed here."""
    n_batch, hw, channels = x.shape
    groups = mean.shape[1]
    blocks = (hw + pixel_task_rows(hw, channels) - 1) // pixel_task_rows(hw, channels)
    dt = mean.dtype
    part_mean = np.empty((n_batch, blocks, groups), np.float64)
    part_m2 = np.empty((n_batch, blocks, groups), np.float64)
    m2 = np.empty(mean.shape, np.float64)   # float64, as groups_stats keeps it: same rstd bits
    s = np.empty((n_batch, channels), dt)
    q = np.empty((n_batch, channels), dt)
    sh = np.empty((n_batch, channels), dt)
    s64 = np.empty((n_batch, channels), np.float64)
    q64 = np.empty((n_batch, channels), np.float64)
    mean_c = np.empty((n_batch, channels), dt)
    rstd_c = np.empty((n_batch, channels), dt)
    a = np.empty((n_batch, channels), dt)
    b = np.empty((n_batch, channels), dt)
    bufs = activation_scratch(a, act, n_batch, max(BLOCK, channels))
    for i in prange(n_batch):
        sample_forward(x, y, np.int64(i), weight, bias, scale, shift, eps, act, mean, rstd, m2, part_mean,
                       part_m2, s, q, sh, s64, q64, mean_c, rstd_c, a, b, bufs)


@njit(**JIT)
def sample_forward(x, y, n, weight, bias, scale, shift, eps, act, mean, rstd, m2, part_mean, part_m2,
                   s, q, sh, s64, q64, mean_c, rstd_c, a, b, bufs):
    """Sample n of forward_samples (scratch row n). Statistics exactly as
    stats_channels_last forms them (same blocks, same merge order)."""
    hw, channels = x.shape[1], x.shape[2]
    groups = mean.shape[1]
    block_rows = pixel_task_rows(hw, channels)
    for k in range((hw + block_rows - 1) // block_rows):
        lo = k * block_rows
        pixel_task_moments(x, n, k, lo, min(lo + block_rows, hw), n, s, q, sh, s64, q64, groups,
                           part_mean, part_m2)
    merge_pixel_blocks(part_mean, part_m2, n, block_rows, hw, channels // groups, mean, m2)
    inv_count = 1.0 / max(hw * (channels // groups), 1)
    for g in range(groups):       # as rstd_from_m2
        rstd[n, g] = 1.0 / np.sqrt(np.float64(m2[n, g]) * inv_count + eps)
    z1_coefs_sample(n, mean, rstd, weight, bias, scale, shift, mean_c, rstd_c, a, b)
    buf = bufs[0]
    if act != NONE:
        buf = bufs[n]
    apply_pixels(x[n], y[n], 0, hw, mean_c[n], a[n], b[n], act, buf)


@njit(parallel=True, **JIT)
def forward_groups(x_groups, y_groups, hw, weight, bias, scale, shift, eps, act, zero, mean, rstd, stream, threads):
    """Contiguous layout, per-(n, g) tasks in ``threads`` contiguous runs (thread_run).
    x_groups, y_groups: (N*G, C/G*HW); mean, rstd: (N, G) outputs."""
    rows = x_groups.shape[0]
    per = max(1, GROUP_BLOCK_ELEMS // x_groups.shape[1])
    for t in prange(threads):
        first, end = thread_run(rows, threads, t)
        groups_run(x_groups, y_groups, first, end, per, hw, weight, bias, scale, shift, eps, act, zero, mean, rstd,
                   stream)


@njit(**JIT)
def groups_run(x_groups, y_groups, first, end, per, hw, weight, bias, scale, shift, eps, act, zero, mean, rstd,
               stream):
    """Groups first..end-1 of forward_groups in blocks of ``per``: the statistics of a
    block's groups, then their apply while the block (at most GROUP_BLOCK_ELEMS
    elements) is warm in cache.

    Why blocks and not group by group: a group's apply waits for its statistics (two
    dependent sums, a square root, a division), and a small group has too little work to
    hide that chain; the statistics of several groups are independent, so the core
    overlaps them. Measured (2 threads, float32, same bits): 2.0x faster at 256x32x8x8,
    1.7x at 64x256x4x4, 1.3-1.5x at 8x1024 and 32x64x32, 1.1x at 16x128x16x16 and
    4x256x28x28 with G = 256; a group of GROUP_BLOCK_ELEMS or more is a block of its own,
    statistics then apply as before. Each group's arithmetic is the same whatever the
    blocking, so results never depend on it (nor on the thread count). A plain callee:
    the prange body's lowering keeps LLVM from vectorising."""
    buf = np.empty(BLOCK if act != NONE else 0, mean.dtype)
    sbuf, out = buf, np.empty(0, y_groups.dtype)
    if stream is not None:   # allocated once per run, and only when used
        sbuf, out = stream_scratch(act, STREAM_SPAN, mean, y_groups)
    for lo in range(first, end, per):
        hi = min(lo + per, end)
        groups_stats(x_groups, lo, hi, eps, zero, mean, rstd)
        groups_apply(x_groups, y_groups, lo, hi, hw, weight, bias, scale, shift, act, zero, mean, rstd, stream, buf,
                     sbuf, out)
    if stream is not None:
        store_fence()


@njit(**JIT)
def groups_stats(x_groups, lo, hi, eps, zero, mean, rstd):
    """mean, rstd of groups lo..hi-1 (rows of x_groups), each by row_moments."""
    groups = mean.shape[1]
    length = x_groups.shape[1]
    for r in range(lo, hi):
        n = r // groups
        g = r - n * groups
        m, m2 = row_moments(x_groups[r], zero)
        mean[n, g] = m
        rstd[n, g] = 1.0 / np.sqrt(m2 * (1.0 / length) + eps)


@elementwise
@njit(cache=True, error_model="numpy", fastmath={"nsz"})   # as apply_kernels
def groups_apply(x_groups, y_groups, lo, hi, hw, weight, bias, scale, shift, act, zero, mean, rstd, stream, buf,
                 sbuf, out):
    """The apply of groups lo..hi-1 of forward_groups, their statistics in mean, rstd.
    buf: (BLOCK,) scratch for an activation; sbuf, out: streaming scratch (stream only).
    One call per block, the group loop inside (a call per group cost a 64-element
    group a third of its time)."""
    groups = mean.shape[1]
    length = x_groups.shape[1]
    cpg = length // hw
    channels = cpg * groups
    for r in range(lo, hi):
        n = r // groups
        g = r - n * groups
        m_acc = mean[n, g]
        rs = np.float64(rstd[n, g])
        for cc in range(cpg):
            c = g * cpg + cc
            w = np.float64(load(weight, c)) if weight.size else 1.0
            bb = np.float64(load(bias, c)) if bias.size else 0.0
            s1 = 1.0 + np.float64(load(scale, n * channels + c)) if scale.size else 1.0
            t = np.float64(load(shift, n * channels + c)) if shift.size else 0.0
            a = cast_like(rs * w * s1, zero)
            b = cast_like(bb * s1 + t, zero)
            if stream is not None:
                apply_span_streamed(x_groups[r], y_groups[r], cc * hw, hw, m_acc, a, b, act, sbuf, out)
            elif act == NONE:
                base = cc * hw
                for i in range(hw):
                    store(y_groups, (r, base + i), (load(x_groups, (r, base + i)) - m_acc) * a + b)
            else:
                apply_span(x_groups[r], y_groups[r], cc * hw, hw, m_acc, a, b, act, buf)
