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
from numba import njit

from .backward_kernels import backward_fused_rows, dx_channels_last, dx_rows, reduce_channels_last, reduce_rows
from .coefs import dx_coefs, gain_coefs, z1_coefs
from .elements import store

JIT = dict(cache=True, error_model="numpy")


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
                        sum_dz_xhat, sum_dz, dweight, dbias):
    """Contiguous layout, one task per (n, g). dy, x, dx: (N*C, HW); mean, rstd: (N, G);
    outputs sum_dz_xhat, sum_dz: (N*C,), and dweight, dbias: (C,) or size 0."""
    n_batch, groups = mean.shape
    channels = cpg * groups
    mean_c, rstd_c, a, b = z1_coefs(mean, rstd, weight, bias, scale, shift, channels)
    gain = gain_coefs(weight, scale, n_batch, channels)
    backward_fused_rows(dy, x, dx, cpg, mean_c.reshape(-1), rstd_c.reshape(-1), a.reshape(-1),
                        b.reshape(-1), gain, act, sum_dz_xhat, sum_dz, need_dx, zero, stream)
    param_sums(sum_dz_xhat, sum_dz, dweight, dbias)


@njit(**JIT)
def group_terms(sum_dz_xhat, sum_dz, gain, groups):
    """(sum_dxhat, sum_dxhat_xhat), each (N, G) in float64: the group sums dx needs."""
    n_batch, channels = sum_dz.shape
    cpg = channels // groups
    s_dxhat = np.empty((n_batch, groups), np.float64)
    s_dxhat_xhat = np.empty((n_batch, groups), np.float64)
    for n in range(n_batch):
        for g in range(groups):   # per group, zero-based: no division per channel
            base = g * cpg
            row = n * channels + base
            t_dxhat = 0.0
            t_dxhat_xhat = 0.0
            for j in range(cpg):
                k = gain[row + j]
                t_dxhat += np.float64(sum_dz[n, base + j]) * k
                t_dxhat_xhat += np.float64(sum_dz_xhat[n, base + j]) * k
            s_dxhat[n, g] = t_dxhat
            s_dxhat_xhat[n, g] = t_dxhat_xhat
    return s_dxhat, s_dxhat_xhat


@njit(**JIT)
def dx_terms(rstd, sum_dz_xhat, sum_dz, weight, scale, count):
    """Per-(n, c) P and Q of dx (see coefs.dx_coefs) from the (N, C) sums."""
    n_batch, channels = sum_dz.shape
    gain = gain_coefs(weight, scale, n_batch, channels)
    s_dxhat, s_dxhat_xhat = group_terms(sum_dz_xhat, sum_dz, gain, rstd.shape[1])
    return dx_coefs(rstd, s_dxhat, s_dxhat_xhat, count, channels)


@njit(**JIT)
def backward_channels_last(dy, x, dx, mean, rstd, weight, bias, scale, shift, act, need_dx, stream, zero,
                           sum_dz_xhat, sum_dz, dweight, dbias):
    """Channels-last: reduce, group terms, dx. dy, x, dx: (N, HW, C); outputs (N, C),
    and dweight, dbias: (C,) or size 0."""
    n_batch, hw, channels = x.shape
    mean_c, rstd_c, a, b = z1_coefs(mean, rstd, weight, bias, scale, shift, channels)
    reduce_channels_last(dy, x, mean_c, rstd_c, a, b, act, sum_dz_xhat, sum_dz, zero)
    param_sums(sum_dz_xhat.reshape(-1), sum_dz.reshape(-1), dweight, dbias)
    if need_dx:
        p, q = dx_terms(rstd, sum_dz_xhat, sum_dz, weight, scale, hw * (channels // mean.shape[1]))
        dx_channels_last(dy, x, dx, mean_c, a, b, p, q, act, stream)


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
