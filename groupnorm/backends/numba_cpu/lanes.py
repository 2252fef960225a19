"""Sums in an order written into the code, so no compiler pass can change it.

Why: a float sum vectorises only if its terms may be regrouped. The kernels used to let
LLVM do that (``fastmath`` reassoc on the sum loops), and LLVM regrouped differently
depending on the module a sum was compiled into: Numba links a callee's optimised code
into each caller's module and optimises it again there, so a kernel compiled in a process
that loaded some callees from another process's disk cache could sum in another order
than the same kernel compiled in one process (last-bit differences between paths; a CI
flake of 2026-11-28). Here the regrouping is explicit instead:

* ``LANES`` partial sums in a stack array (``lanes_of``): term i of a sum goes to lane
  i % LANES, each lane adding its terms in index order. Each update is elementwise across
  the lanes, so LLVM vectorises it without reassociation; the last, partial block of
  LANES terms is added through masked loads, the missing lanes adding exact zeros.
* ``total`` adds the lanes by halves (lanes[:h] + lanes[h:] until one is left), strict
  adds on explicit LLVM vector shuffles: the same tree in every caller, fresh or cached.

Measured 2026-11-28 against the reassociated loops they replace (``benchmarks/ab_fixed_order_sums.py``
at eb1f750): parity (0.8-1.15x the time) from rows of 64 elements
to 16384, the same accuracy. Three details matter: the array starts on a cache line (an
unaligned one made the time swing 1.3-6x between processes), the masked tail indexes
with unsigned integers (a signed index keeps Numba's negative-index wraparound, which
LLVM turns into gathers), and the lanes are zeroed by one vector store (``clear``; a
zeroing loop inlined from a helper made short-row sums 5x slower).
"""
from __future__ import annotations

import llvmlite.ir as ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 64   # partial sums per sum: 4 AVX-512 registers of float32, 8 of float64
ALIGN = 64   # bytes: the lanes start on a cache line

JIT = dict(cache=True, error_model="numpy", fastmath={"nsz"})


@intrinsic
def _stack_lanes(typingctx, like):
    """A pointer to LANES elements of like's type on the calling function's stack."""
    if not isinstance(like, types.Float):
        return None

    def codegen(context, builder, signature, args):
        lanes = cgutils.alloca_once(builder, context.get_value_type(like), size=LANES)
        lanes.align = ALIGN
        return lanes

    return types.CPointer(like)(like), codegen


@intrinsic
def total(typingctx, lanes):
    """The sum of a lanes array: its LANES values added by halves with strict (never
    regrouped) vector adds, the same tree in every caller."""
    if not isinstance(lanes, types.Array) or not isinstance(lanes.dtype, types.Float):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(lanes)(context, builder, args[0])
        element = context.get_value_type(lanes.dtype)
        vector = builder.load(builder.bitcast(array.data, ir.VectorType(element, LANES).as_pointer()), align=ALIGN)
        half = LANES
        while half > 1:
            half //= 2
            index = ir.VectorType(ir.IntType(32), half)
            low = builder.shuffle_vector(vector, vector, ir.Constant(index, list(range(half))))
            high = builder.shuffle_vector(vector, vector, ir.Constant(index, list(range(half, 2 * half))))
            vector = builder.fadd(low, high)
        return builder.extract_element(vector, ir.Constant(ir.IntType(32), 0))

    return lanes.dtype(lanes), codegen


@intrinsic
def clear(typingctx, lanes):
    """Every lane of a lanes array back to zero, as one vector store. (A zeroing loop
    inlined from a helper made the backward row sums 5x slower: LLVM kept the lanes in
    memory around it; a loop written inside each kernel did not, but is easy to forget.)"""
    if not isinstance(lanes, types.Array) or not isinstance(lanes.dtype, types.Float):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(lanes)(context, builder, args[0])
        vector = ir.VectorType(context.get_value_type(lanes.dtype), LANES)
        builder.store(ir.Constant(vector, None), builder.bitcast(array.data, vector.as_pointer()), align=ALIGN)
        return context.get_dummy_value()

    return types.none(lanes), codegen


@njit(inline="always", **JIT)
def lanes_of(zero):
    """LANES partial sums of zero's type, set to zero, on the caller's stack (inlined, so
    the memory is the caller's: use them only inside the function that made them). Each
    call site is one array, made at the function's entry, so a call inside a loop just
    zeroes it again; ``clear`` does the same for an array made before the loop."""
    lanes = carray(_stack_lanes(zero), LANES)
    clear(lanes)
    return lanes
