"""Kernels for ab_fixed_order_sums.py (loaded by it as a module of the Numba package, so
the package's LLVM function attributes apply as they do to the real kernels).

A sum in a fixed order that no compiler pass may regroup: LANES partial sums in a stack
array (element j takes elements j, j + LANES, ...; each update is elementwise, so LLVM
vectorises it without reassociation), then a tree of strict adds by halves written as
explicit LLVM vector shuffles (``tree_total``). Each kernel here has the contract of a
library sum function compiled with ``reassoc`` (LLVM picks the partial sums), which the
A/B script runs as the other side.
"""
from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from groupnorm.backends.numba_cpu.elements import load
from groupnorm.backends.numba_cpu.stats_kernels import shifted_chunk_moments

LANES = 64
ALIGN = 64   # bytes: the stack lanes start on a cache line
JIT = dict(cache=False, error_model="numpy", fastmath={"contract", "nsz"})


@intrinsic
def stack_lanes(typingctx, like):
    """A pointer to LANES elements of like's type on the caller's stack."""
    if not isinstance(like, types.Float):
        return None

    def codegen(context, builder, signature, args):
        lanes = cgutils.alloca_once(builder, context.get_value_type(like), size=LANES)
        lanes.align = ALIGN   # whole cache lines: no load or store of the lanes splits one
        return lanes

    return types.CPointer(like)(like), codegen


@intrinsic
def tree_total(typingctx, pointer):
    """The LANES values at pointer summed by halves (v[:h] + v[h:] until one is left) with
    strict adds: the order is in the IR, no optimisation may change it."""
    if not isinstance(pointer, types.CPointer):
        return None

    def codegen(context, builder, signature, args):
        element = context.get_value_type(pointer.dtype)
        vector = builder.load(builder.bitcast(args[0], ir.VectorType(element, LANES).as_pointer()),
                              align=ALIGN)
        half = LANES
        while half > 1:
            half //= 2
            index = ir.VectorType(ir.IntType(32), half)
            low = builder.shuffle_vector(vector, vector, ir.Constant(index, list(range(half))))
            high = builder.shuffle_vector(vector, vector, ir.Constant(index, list(range(half, 2 * half))))
            vector = builder.fadd(low, high)
        return builder.extract_element(vector, ir.Constant(ir.IntType(32), 0))

    return pointer.dtype(pointer), codegen


@njit(**JIT)
def shifted_fixed(row, lo, hi, shift, zero):
    """stats_kernels.shifted_chunk_moments (the library's reassociated sums) with its two
    sums in the fixed order: (mean, m2) of row[lo:hi] in float64."""
    v = row[lo:hi]
    n = v.shape[0]
    ps, pq = stack_lanes(zero), stack_lanes(zero)
    s, q = carray(ps, LANES), carray(pq, LANES)
    for j in range(LANES):
        s[j] = zero
        q[j] = zero
    full = n - n % LANES
    for i in range(0, full, LANES):
        for j in range(LANES):
            d = load(v, i + j) - shift
            s[j] += d
            q[j] += d * d
    if full < n:   # the last partial block: masked lanes add exact zeros
        for j in range(LANES):
            d = load(v, min(full + j, n - 1)) - shift if full + j < n else zero
            s[j] += d
            q[j] += d * d
    s64 = np.float64(tree_total(ps))
    return np.float64(shift) + s64 / n, max(np.float64(tree_total(pq)) - s64 * s64 / n, 0.0)


@njit(**JIT)
def repeat_shifted(fixed, row, reps, zero):
    """reps calls of one side on the whole row (the call overhead counted on both sides)."""
    total = 0.0
    for _ in range(reps):
        if fixed:
            mean, m2 = shifted_fixed(row, 0, row.shape[0], zero, zero)
        else:
            mean, m2 = shifted_chunk_moments(row, 0, row.shape[0], zero, zero)
        total += mean + m2
    return total


@njit(**JIT)
def rows_fixed(dy, x, lo, hi, mean_c, rstd_c, sum_dz_xhat, sum_dz, zero):
    """backward_kernels.reduce_rows_none (short rows) with its two sums in the fixed
    order: per row r, rstd_c[r] * sum(dy * (x - mean_c[r])) and sum(dy)."""
    length = x.shape[1]
    full = length - length % LANES
    pa, pb = stack_lanes(zero), stack_lanes(zero)
    sa, sb = carray(pa, LANES), carray(pb, LANES)
    dy_flat, x_flat = dy.reshape(-1), x.reshape(-1)
    for r in range(lo, hi):
        m = mean_c[r]
        for j in range(LANES):
            sa[j] = zero
            sb[j] = zero
        for i in range(0, full, LANES):
            for j in range(LANES):
                g = load(dy, (r, i + j))
                sa[j] += g * (load(x, (r, i + j)) - m)
                sb[j] += g
        if full < length:   # the last partial block: masked lanes add exact zeros
            tail = np.uint64(r * length + full)   # unsigned: no negative-index wraparound, so a masked load, not a gather
            for j in range(LANES):
                inside = full + j < length
                g = load(dy_flat, tail + np.uint64(j)) if inside else zero
                d = load(x_flat, tail + np.uint64(j)) - m if inside else zero
                sa[j] += g * d
                sb[j] += g
        sum_dz_xhat[r] = tree_total(pa) * rstd_c[r]
        sum_dz[r] = tree_total(pb)
