"""Kernels for ab_fixed_order_sums.py (loaded by it as a module of the Numba package, so
the package's LLVM function attributes apply as they do to the real kernels).

A sum in a fixed order that no compiler pass may regroup: LANES partial sums in a stack
array (element j takes elements j, j + LANES, ...; each update is elementwise, so LLVM
vectorises it without reassociation), then a tree of strict adds by halves written as
explicit LLVM vector shuffles (``tree_total``). Against it, the library's way: one scalar
accumulator compiled with ``reassoc`` (LLVM picks the partial sums).
"""
from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from groupnorm.backends.numba_cpu.elements import load

LANES = 64
JIT = dict(cache=False, error_model="numpy", fastmath={"contract", "nsz"})
JIT_SUM = dict(cache=False, error_model="numpy", fastmath={"reassoc", "contract", "nsz"})


@intrinsic
def stack_lanes(typingctx, like):
    """A pointer to LANES elements of like's type on the caller's stack."""
    if not isinstance(like, types.Float):
        return None

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(like), size=LANES)

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
                              align=context.get_abi_sizeof(element))   # the stack array's alignment
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
def shifted_fixed(row, shift, zero):
    """(sum(x - shift), sum((x - shift)^2)) in the fixed order."""
    n = row.shape[0]
    ps, pq = stack_lanes(zero), stack_lanes(zero)
    s, q = carray(ps, LANES), carray(pq, LANES)
    for j in range(LANES):
        s[j] = zero
        q[j] = zero
    full = n - n % LANES
    for i in range(0, full, LANES):
        for j in range(LANES):
            d = load(row, i + j) - shift
            s[j] += d
            q[j] += d * d
    for j in range(n - full):
        d = load(row, full + j) - shift
        s[j] += d
        q[j] += d * d
    return tree_total(ps), tree_total(pq)


@njit(**JIT_SUM)
def shifted_reassoc(row, shift, zero):
    """The same sums as one reassociated accumulator each (the library's way)."""
    s = zero
    q = zero
    for i in range(row.shape[0]):
        d = load(row, i) - shift
        s += d
        q += d * d
    return s, q


@njit(**JIT)
def repeat_shifted(fixed, row, reps, zero):
    total = 0.0
    for _ in range(reps):
        s, q = shifted_fixed(row, zero, zero) if fixed else shifted_reassoc(row, zero, zero)
        total += s + q
    return total


@njit(**JIT)
def rows_fixed(dy, x, mean, out_xc, out_dz, zero):
    """Per row r: sum(dy * (x - mean[r])) and sum(dy), the backward's reduce_rows_none."""
    rows, length = x.shape
    full = length - length % LANES
    pa, pb = stack_lanes(zero), stack_lanes(zero)
    sa, sb = carray(pa, LANES), carray(pb, LANES)
    for r in range(rows):
        m = mean[r]
        for j in range(LANES):
            sa[j] = zero
            sb[j] = zero
        for i in range(0, full, LANES):
            for j in range(LANES):
                g = load(dy, (r, i + j))
                sa[j] += g * (load(x, (r, i + j)) - m)
                sb[j] += g
        for j in range(length - full):
            g = load(dy, (r, full + j))
            sa[j] += g * (load(x, (r, full + j)) - m)
            sb[j] += g
        out_xc[r] = tree_total(pa)
        out_dz[r] = tree_total(pb)


@njit(**JIT_SUM)
def rows_reassoc(dy, x, mean, out_xc, out_dz, zero):
    rows, length = x.shape
    for r in range(rows):
        m = mean[r]
        s_xc = zero
        s_dz = zero
        for i in range(length):
            g = load(dy, (r, i))
            s_xc += g * (load(x, (r, i)) - m)
            s_dz += g
        out_xc[r] = s_xc
        out_dz[r] = s_dz
