"""Compiled entry points: a whole backward in one call from Python.

Every call into a Numba function costs microseconds of argument unboxing, and every array
it returns costs a boxing; on small shapes (an SD UNet's 2x1280x8x8) the glue around the
kernels used to cost more than the kernels. These entries take the raw statistics and
parameters, form the coefficients, run the kernels and the small (N, C) -> (N, G) / (C,)
reductions in compiled code, so the launcher makes one call per backward.

The per-element kernels are the ones in backward_kernels; only the glue moved here.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .activations import NONE
from .backward_kernels import (BLOCK, backward_fused_rows, dx_channels_last, dx_pixels, dx_rows, merge_blocks,
                               pixel_rows, reduce_channels_last, reduce_pixel_run, reduce_rows)
from .coefs import gain_coefs, z1_coefs, z1_coefs_sample
from .elements import load, store
from .pixel_tasks import activation_scratch

JIT = dict(cache=True, error_model="numpy", fastmath=False)   # stated, never inherited (see activations.SCALAR)


@njit(**JIT)
def column_sums(sums, out):
    """out[c] = sum_n sums[n * C + c] in float64, n in order (dweight / dbias without scale),
    rounded once into out's dtype (a half-type parameter's gradient is written as its bits)."""
    channels = out.shape[0]
    n_batch = sums.shape[0] // channels
    acc = np.zeros(channels, np.float64)
    for n in range(n_batch):   # sample-major: the channel loop vectorises (same order per c)
        row = sums[n * channels:(n + 1) * channels]
        for c in range(channels):
            acc[c] += np.float64(row[c])
    for c in range(channels):
        store(out, c, acc[c])


@njit(**JIT)
def param_sums(sum_dz_xhat, sum_dz, dweight, dbias):
    """dweight / dbias (no scale) from the flat (N*C,) sums; size-0 outputs are skipped."""
    if dweight.size:
        column_sums(sum_dz_xhat, dweight)
    if dbias.size:
        column_sums(sum_dz, dbias)


@njit(**JIT)
def backward_rows_fused(dy, x, dx, cpg, mean, rstd, weight, bias, scale, shift, act, need_dx, stream, zero,
                        sum_dz_xhat, sum_dz, dweight, dbias, threads):
    """Contiguous layout, per-(n, g) tasks in ``threads`` runs. dy, x, dx: (N*C, HW); mean,
    rstd: (N, G); outputs sum_dz_xhat, sum_dz: (N*C,), and dweight, dbias: (C,) or size 0."""
    n_batch, groups = mean.shape
    channels = cpg * groups
    mean_c, rstd_c, a, b = z1_coefs(mean, rstd, weight, bias, scale, shift, channels)
    gain = gain_coefs(weight, scale, n_batch, channels)
    backward_fused_rows(dy, x, dx, cpg, mean_c.reshape(-1), rstd_c.reshape(-1), a.reshape(-1),
                        b.reshape(-1), gain, act, sum_dz_xhat, sum_dz, need_dx, zero, stream, threads)
    param_sums(sum_dz_xhat, sum_dz, dweight, dbias)


@njit(**JIT)
def dx_terms_sample(n, rstd, sum_dz_xhat, sum_dz, weight, scale, count, p, q):
    """Row n of dx's P and Q (see coefs.dx_coefs), written into p, q (N, C), from the
    (N, C) sums: the group sums of dxhat and dxhat * xhat in float64, channels in order,
    gain w * (1 + s) per channel. One sample at a time, so a per-sample task forms its own
    (backward_samples) with the bits dx_terms gives."""
    channels = sum_dz.shape[1]
    groups = rstd.shape[1]
    cpg = channels // groups
    has_w, has_s = weight.size > 0, scale.size > 0
    inv_count = 1.0 / max(count, 1)
    for g in range(groups):   # per group, zero-based: no division per channel
        base = g * cpg
        t_dxhat = 0.0
        t_dxhat_xhat = 0.0
        for j in range(cpg):
            c = base + j
            w = np.float64(load(weight, c)) if has_w else 1.0
            s1 = 1.0 + np.float64(load(scale, n * channels + c)) if has_s else 1.0
            k = w * s1
            t_dxhat += np.float64(sum_dz[n, c]) * k
            t_dxhat_xhat += np.float64(sum_dz_xhat[n, c]) * k
        r = np.float64(rstd[n, g])
        pg = -r * r * t_dxhat_xhat * inv_count
        qg = -r * t_dxhat * inv_count
        for j in range(cpg):   # zero-based: vectorises (see coefs.z1_coefs_sample)
            p[n, base + j] = pg
            q[n, base + j] = qg


@njit(**JIT)
def dx_terms(rstd, sum_dz_xhat, sum_dz, weight, scale, count):
    """Per-(n, c) P and Q of dx (see coefs.dx_coefs) from the (N, C) sums."""
    n_batch, channels = sum_dz.shape
    p = np.empty((n_batch, channels), rstd.dtype)
    q = np.empty((n_batch, channels), rstd.dtype)
    for n in range(n_batch):
        dx_terms_sample(n, rstd, sum_dz_xhat, sum_dz, weight, scale, count, p, q)
    return p, q


@njit(**JIT)
def backward_channels_last(dy, x, dx, mean, rstd, weight, bias, scale, shift, act, need_dx, stream, zero,
                           sum_dz_xhat, sum_dz, dweight, dbias, threads):
    """Channels-last: reduce, group terms, dx. dy, x, dx: (N, HW, C); outputs (N, C),
    and dweight, dbias: (C,) or size 0. The two passes run in ``threads`` runs of pixel
    blocks, dx walking them backwards (pixel_tasks.thread_run)."""
    n_batch, hw, channels = x.shape
    mean_c, rstd_c, a, b = z1_coefs(mean, rstd, weight, bias, scale, shift, channels)
    reduce_channels_last(dy, x, mean_c, rstd_c, a, b, act, sum_dz_xhat, sum_dz, zero, threads)
    param_sums(sum_dz_xhat.reshape(-1), sum_dz.reshape(-1), dweight, dbias)
    if need_dx:
        p, q = dx_terms(rstd, sum_dz_xhat, sum_dz, weight, scale, hw * (channels // mean.shape[1]))
        dx_channels_last(dy, x, dx, mean_c, a, b, p, q, act, stream, threads)


@njit(**JIT)
def backward_rows_two_stage(dy, x, dx, mean, rstd, weight, bias, scale, shift, act, need_dx, stream, zero,
                            sum_dz_xhat, sum_dz, dweight, dbias):
    """Contiguous with few groups (parallel over rows, not groups): reduce, group terms,
    dx. dy, x, dx: (N*C, HW); outputs (N, C), and dweight, dbias: (C,) or size 0."""
    n_batch, channels = sum_dz.shape
    mean_c, rstd_c, a, b = z1_coefs(mean, rstd, weight, bias, scale, shift, channels)
    reduce_rows(dy, x, mean_c.reshape(-1), rstd_c.reshape(-1), a.reshape(-1), b.reshape(-1), act,
                sum_dz_xhat.reshape(-1), sum_dz.reshape(-1), zero)
    param_sums(sum_dz_xhat.reshape(-1), sum_dz.reshape(-1), dweight, dbias)
    if need_dx:
        p, q = dx_terms(rstd, sum_dz_xhat, sum_dz, weight, scale, x.shape[1] * (channels // mean.shape[1]))
        dx_rows(dy, x, dx, mean_c.reshape(-1), a.reshape(-1), b.reshape(-1), p.reshape(-1),
                q.reshape(-1), act, stream)


@njit(parallel=True, **JIT)
def backward_samples(dy, x, dx, mean, rstd, weight, bias, scale, shift, act, need_dx, zero, sum_dz_xhat, sum_dz,
                     dweight, dbias):
    """Channels-last, one task per sample (small samples, at least as many as threads:
    forward_kernels.channels_last_per_sample, the forward's rule): coefficients, sums,
    dx terms and dx of a sample in one task, while the sample is warm in cache. One
    fork/join instead of two, and the per-sample serial work of backward_channels_last
    (coefficients, block merges, dx terms: ~10 us at 2x1280x8x8) runs in parallel.
    The same pixel blocks, merge order and arithmetic as backward_channels_last, so the
    same bits (the thread count picks between them). Small samples: dx never streamed."""
    n_batch, hw, channels = x.shape
    dt = mean.dtype
    blocks = (hw + pixel_rows(channels) - 1) // pixel_rows(channels)
    mean_c = np.empty((n_batch, channels), dt)
    rstd_c = np.empty((n_batch, channels), dt)
    a = np.empty((n_batch, channels), dt)
    b = np.empty((n_batch, channels), dt)
    p = np.empty((n_batch, channels), dt)
    q = np.empty((n_batch, channels), dt)
    part_xc = np.empty((n_batch * blocks, channels), dt)
    part_dz = np.empty((n_batch * blocks, channels), dt)
    bufs = activation_scratch(a, act, n_batch, max(BLOCK, channels))
    for i in prange(n_batch):
        backward_sample(dy, x, dx, np.int64(i), mean, rstd, weight, bias, scale, shift, act, need_dx, zero,
                        sum_dz_xhat, sum_dz, mean_c, rstd_c, a, b, p, q, part_xc, part_dz, bufs)
    param_sums(sum_dz_xhat.reshape(-1), sum_dz.reshape(-1), dweight, dbias)


@njit(**JIT)
def backward_sample(dy, x, dx, n, mean, rstd, weight, bias, scale, shift, act, need_dx, zero, sum_dz_xhat, sum_dz,
                    mean_c, rstd_c, a, b, p, q, part_xc, part_dz, bufs):
    """Sample n of backward_samples (scratch rows n): its pixel blocks reduced as one run of
    reduce_channels_last's tasks (same partial rows). A plain callee: the views are made
    outside the prange body."""
    hw, channels = x.shape[1], x.shape[2]
    z1_coefs_sample(n, mean, rstd, weight, bias, scale, shift, mean_c, rstd_c, a, b)
    block_rows = pixel_rows(channels)
    blocks = (hw + block_rows - 1) // block_rows
    reduce_pixel_run(dy, x, n * blocks, (n + 1) * blocks, blocks, block_rows, mean_c, a, b, act, part_xc, part_dz,
                     bufs, n, zero)
    merge_blocks(part_xc, part_dz, n * blocks, blocks, rstd_c, n, sum_dz_xhat, sum_dz)
    if need_dx:
        dx_terms_sample(n, rstd, sum_dz_xhat, sum_dz, weight, scale, hw * (channels // mean.shape[1]), p, q)
        buf = bufs[0]
        if act != NONE:
            buf = bufs[n]
        dx_pixels(dy[n], x[n], dx[n], 0, hw, mean_c[n], a[n], b[n], p[n], q[n], act, buf)
