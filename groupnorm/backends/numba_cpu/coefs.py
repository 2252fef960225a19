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
    per-sample task form its own coefficients.

    Loops run per group over zero-based channel offsets: ``range(lo, hi)`` with a
    computed lo (or a ``c // cpg`` per channel) kept LLVM from vectorising and cost
    5-10x as much (~10 us at C = 1280, N = 2, on every call)."""
    groups = mean.shape[1]
    channels = a.shape[1]
    cpg = channels // groups
    has_w, has_b = weight.size > 0, bias.size > 0
    has_s, has_t = scale.size > 0, shift.size > 0
    row = n * channels
    for g in range(groups):
        r = np.float64(rstd[n, g])
        m = mean[n, g]
        rs = rstd[n, g]
        base = g * cpg
        for j in range(cpg):
            mean_c[n, base + j] = m
            rstd_c[n, base + j] = rs
        if has_s or has_t:
            for j in range(cpg):
                c = base + j
                w = np.float64(load(weight, c)) if has_w else 1.0
                bb = np.float64(load(bias, c)) if has_b else 0.0
                s1 = 1.0 + np.float64(load(scale, row + c)) if has_s else 1.0
                t = np.float64(load(shift, row + c)) if has_t else 0.0
                a[n, c] = r * w * s1
                b[n, c] = bb * s1 + t
        else:   # the everyday case, branch-free loops
            if has_w:
                for j in range(cpg):
                    a[n, base + j] = r * np.float64(load(weight, base + j))
            else:
                for j in range(cpg):
                    a[n, base + j] = r
            if has_b:
                for j in range(cpg):
                    b[n, base + j] = load(bias, base + j)
            else:
                for j in range(cpg):
                    b[n, base + j] = 0.0


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
            base = g * cpg
            for j in range(cpg):   # zero-based: vectorises (see z1_coefs_sample)
                p[n, base + j] = pg
                q[n, base + j] = qg
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
