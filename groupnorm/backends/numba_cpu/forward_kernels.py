"""The whole forward in one compiled call: statistics, rstd, coefficients, apply.

One dispatch instead of four keeps the Python overhead off small shapes. With enough
groups (N*G >= GROUP_TASKS_MIN) the contiguous forward is a single parallel region of
per-group tasks: statistics, then the apply while the group is still warm in cache, and
one fork/join instead of two (each fork/join costs microseconds, or a whole scheduler
slice on a busy machine). Statistics are bitwise the same as stats_rows computes.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from numba import prange

from .apply_kernels import BLOCK, apply_channels_last, apply_rows, apply_span
from .coefs import z1_coefs
from .activations import NONE
from .elements import cast_like, load, store
from .stats_kernels import row_moments, stats_channels_last, stats_rows

JIT = dict(cache=True, error_model="numpy")
GROUP_TASKS_MIN = 8       # per-group tasks balance over the cores from this many groups


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


@njit(parallel=True, **JIT)
def forward_groups(x_groups, y_groups, hw, weight, bias, scale, shift, eps, act, zero, mean, rstd):
    """Contiguous layout, one task per (n, g). x_groups, y_groups: (N*G, C/G*HW);
    mean, rstd: (N, G) outputs."""
    for r in prange(x_groups.shape[0]):
        group_task(x_groups, y_groups, r, hw, weight, bias, scale, shift, eps, act, zero, mean, rstd)


@njit(cache=True, error_model="numpy", fastmath={"contract", "nsz"})   # as apply_kernels
def group_task(x_groups, y_groups, r, hw, weight, bias, scale, shift, eps, act, zero, mean, rstd):
    """One (n, g) group of forward_groups: statistics, then the apply while it is warm.
    A plain callee (the prange body's lowering keeps LLVM from vectorising)."""
    groups = mean.shape[1]
    length = x_groups.shape[1]
    cpg = length // hw
    channels = cpg * groups
    n = r // groups
    g = r - n * groups
    xr = x_groups[r]
    yr = y_groups[r]
    m, m2 = row_moments(xr, zero)
    rs = 1.0 / np.sqrt(m2 * (1.0 / length) + eps)
    mean[n, g] = m
    rstd[n, g] = rs
    m_acc = mean[n, g]
    buf = np.empty(BLOCK if act != NONE else 0, mean.dtype)
    for cc in range(cpg):
        c = g * cpg + cc
        w = np.float64(weight[c]) if weight.size else 1.0
        bb = np.float64(bias[c]) if bias.size else 0.0
        s1 = 1.0 + np.float64(scale[n * channels + c]) if scale.size else 1.0
        t = np.float64(shift[n * channels + c]) if shift.size else 0.0
        a = cast_like(np.float64(rstd[n, g]) * w * s1, zero)
        b = cast_like(bb * s1 + t, zero)
        if act == NONE:
            lo = cc * hw
            for i in range(hw):
                store(y_groups, (r, lo + i), (load(x_groups, (r, lo + i)) - m_acc) * a + b)
        else:
            apply_span(xr, yr, cc * hw, hw, m_acc, a, b, act, buf)
