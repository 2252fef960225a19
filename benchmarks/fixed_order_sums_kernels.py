"""The former sum loops, for ab_fixed_order_sums.py (loaded by it as a module of the
Numba package, so the package's LLVM function attributes apply as they did to them).

Until the fourteenth session the statistics and backward row sums were single scalar
accumulators compiled with ``reassoc`` (LLVM picked the partial sums, and could pick
them differently per compilation context); these are those loops, with the contracts of
``stats_kernels.shifted_chunk_moments`` and ``backward_kernels.reduce_rows_none`` (short
rows), which now sum in lanes (``lanes.py``).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from groupnorm.backends.numba_cpu.elements import load

JIT = dict(cache=False, error_model="numpy", fastmath={"contract", "nsz"})
JIT_SUM = dict(cache=False, error_model="numpy", fastmath={"reassoc", "contract", "nsz"})


@njit(**JIT_SUM)
def shifted_reassoc(row, lo, hi, shift, zero):
    v = row[lo:hi]
    n = v.shape[0]
    s = zero
    q = zero
    for i in range(n):
        d = load(v, i) - shift
        s += d
        q += d * d
    s64 = np.float64(s)
    return np.float64(shift) + s64 / n, max(np.float64(q) - s64 * s64 / n, 0.0)


@njit(**JIT_SUM)
def rows_reassoc(dy, x, lo, hi, mean_c, rstd_c, sum_dz_xhat, sum_dz, zero):
    length = x.shape[1]
    for r in range(lo, hi):
        m = mean_c[r]
        s_xc = zero
        s_dz = zero
        for i in range(length):
            g = load(dy, (r, i))
            s_xc += g * (load(x, (r, i)) - m)
            s_dz += g
        sum_dz_xhat[r] = s_xc * rstd_c[r]
        sum_dz[r] = s_dz


@njit(**JIT)
def repeat_shifted(lanes, row, reps, zero, library):
    """reps calls of one side on the whole row (the call overhead counted on both sides);
    library: stats_kernels.shifted_chunk_moments, passed in."""
    total = 0.0
    for _ in range(reps):
        if lanes:
            mean, m2 = library(row, 0, row.shape[0], zero, zero)
        else:
            mean, m2 = shifted_reassoc(row, 0, row.shape[0], zero, zero)
        total += mean + m2
    return total
