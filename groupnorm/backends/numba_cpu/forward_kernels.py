"""The whole forward in one compiled call: statistics, rstd, coefficients, apply.

One dispatch instead of four keeps the Python overhead off small shapes; each stage is
still its own kernel (stats_kernels, coefs, apply_kernels).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .apply_kernels import apply_channels_last, apply_rows
from .coefs import z1_coefs
from .stats_kernels import stats_channels_last, stats_rows

JIT = dict(cache=True, error_model="numpy")


@njit(**JIT)
def rstd_from_m2(m2, count, eps, rstd):
    """rstd = 1 / sqrt(m2 / count + eps) (biased variance, eps inside the root)."""
    inv_count = 1.0 / max(count, 1)
    for i in range(m2.size):
        rstd.flat[i] = 1.0 / np.sqrt(np.float64(m2.flat[i]) * inv_count + eps)


@njit(**JIT)
def forward_rows(x_groups, x_rows, y_rows, weight, bias, scale, shift, eps, act, zero, mean, rstd):
    """Contiguous layout. x_groups: (N*G, C/G*HW) and x_rows/y_rows: (N*C, HW) views of
    the same memory; mean, rstd: (N, G) outputs."""
    n_batch, groups = mean.shape
    channels = x_rows.shape[0] // n_batch
    m2 = np.empty_like(mean)
    stats_rows(x_groups, mean.reshape(n_batch * groups), m2.reshape(n_batch * groups), zero)
    rstd_from_m2(m2, x_groups.shape[1], eps, rstd)
    mean_c, _, a, b = z1_coefs(mean, rstd, weight, bias, scale, shift, channels)
    rows = n_batch * channels
    apply_rows(x_rows, y_rows, mean_c.reshape(rows), a.reshape(rows), b.reshape(rows), act)


@njit(**JIT)
def forward_channels_last(x, y, weight, bias, scale, shift, eps, act, zero, mean, rstd):
    """Channels-last layout. x, y: (N, HW, C); mean, rstd: (N, G) outputs."""
    n_batch, hw, channels = x.shape
    groups = mean.shape[1]
    m2 = np.empty_like(mean)
    stats_channels_last(x, groups, mean, m2, zero)
    rstd_from_m2(m2, hw * (channels // groups), eps, rstd)
    mean_c, _, a, b = z1_coefs(mean, rstd, weight, bias, scale, shift, channels)
    apply_channels_last(x, y, mean_c, a, b, act)
