"""Per-(n, c) coefficients that fold the epilogue's affine steps into one multiply-add.

    z1 = ((x - mean) * rstd * w + b) * (1 + s) + t  =  (x - mean) * A + B
    A  = rstd * w * (1 + s),   B = b * (1 + s) + t          (A, B per (n, c))

x - mean is formed first so a large mean never cancels catastrophically. Computed in
float64 (N * C numbers) and stored in the accumulation dtype. Absent parameters arrive
as size-0 arrays; bfloat16 / float16 parameters arrive as their raw bits (uint16 / int16
views, read through ``elements.load``), so the launcher converts nothing per call.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .elements import load


@njit(cache=True, error_model="numpy", fastmath=False)
def z1_coefs_sample(n, mean, rstd, weight, bias, scale, shift, mean_c, rstd_c, a, b):
    """Row n of z1_coefs' outputs, written into mean_c, rstd_c, a, b (N, C): lets a
    per-sample task form its own coefficients."""
    groups = mean.shape[1]
    channels = a.shape[1]
    cpg = channels // groups
    for c in range(channels):
        g = c // cpg
        w = np.float64(load(weight, c)) if weight.size else 1.0
        bb = np.float64(load(bias, c)) if bias.size else 0.0
        s1 = 1.0 + np.float64(load(scale, n * channels + c)) if scale.size else 1.0
        t = np.float64(load(shift, n * channels + c)) if shift.size else 0.0
        r = np.float64(rstd[n, g])
        mean_c[n, c] = mean[n, g]
        rstd_c[n, c] = r
        a[n, c] = r * w * s1
        b[n, c] = bb * s1 + t


@njit(cache=True, error_model="numpy", fastmath=False)
def z1_coefs(mean, rstd, weight, bias, scale, shift, channels):
    """mean, rstd: (N, G); weight, bias: (C,) or empty; scale, shift: (N*C,) or empty.

    Returns (mean_c, rstd_c, A, B), each (N, C) in mean's dtype.
    """
    n_batch = mean.shape[0]
    mean_c = np.empty((n_batch, channels), mean.dtype)
    rstd_c = np.empty((n_batch, channels), mean.dtype)
    a = np.empty((n_batch, channels), mean.dtype)
    b = np.empty((n_batch, channels), mean.dtype)
    for n in range(n_batch):
        z1_coefs_sample(n, mean, rstd, weight, bias, scale, shift, mean_c, rstd_c, a, b)
    return mean_c, rstd_c, a, b


@njit(cache=True, error_model="numpy", fastmath=False)
def dx_coefs(rstd, sum_dxhat, sum_dxhat_xhat, count, channels):
    """The two per-group terms of dx (see backward_kernels), expanded to (N, C).

    P = -rstd^2 * sum_dxhat_xhat / count  (multiplies x - mean)
    Q = -rstd * sum_dxhat / count         (constant)
    """
    n_batch, groups = rstd.shape
    cpg = channels // groups
    inv_count = 1.0 / max(count, 1)
    p = np.empty((n_batch, channels), rstd.dtype)
    q = np.empty((n_batch, channels), rstd.dtype)
    for n in range(n_batch):
        for g in range(groups):
            r = np.float64(rstd[n, g])
            pg = -r * r * np.float64(sum_dxhat_xhat[n, g]) * inv_count
            qg = -r * np.float64(sum_dxhat[n, g]) * inv_count
            for c in range(g * cpg, (g + 1) * cpg):
                p[n, c] = pg
                q[n, c] = qg
    return p, q


@njit(cache=True, error_model="numpy", fastmath=False)
def gain_coefs(weight, scale, n_batch, channels):
    """w * (1 + s) per (n, c) as a flat float64 (N*C,) array (absent parameters: 1)."""
    gain = np.empty(n_batch * channels, np.float64)
    for n in range(n_batch):
        for c in range(channels):
            w = np.float64(load(weight, c)) if weight.size else 1.0
            s1 = 1.0 + np.float64(load(scale, n * channels + c)) if scale.size else 1.0
            gain[n * channels + c] = w * s1
    return gain
