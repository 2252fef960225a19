"""store_out: elements.store with a cheaper bfloat16 rounding, for the hot output loops.

bits.f32_to_bf16 tests for NaN on the integer pattern, which LLVM vectorises as an
emulated unsigned compare plus a byte blend after packing (about 20 vector instructions
per 8 values, the larger part of a bfloat16 apply). Here a NaN is first replaced by the
canonical quiet-NaN float (one compare, one blend), then the same round-to-nearest-even
add runs: the result equals bits.f32_to_bf16 for every float32 (tests/test_cl_kernels.py).
Other dtypes go to elements.store unchanged.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from .bits import bits_to_f32, f32_to_bits
from .elements import store

BF16_QNAN_AS_F32 = 0x7FC00000   # rounds to 0x7FC0, torch's canonical bfloat16 NaN


@njit(cache=True, error_model="numpy", fastmath=False)   # stated, not inherited: the NaN test must stay
def f32_to_bf16_fast(x):
    """float32 -> bfloat16 bits, round to nearest even; NaN -> 0x7FC0 (as f32_to_bf16)."""
    v = np.float32(x)
    b = f32_to_bits(v if v == v else bits_to_f32(BF16_QNAN_AS_F32))
    # No carry past bit 31: the largest non-NaN pattern, 0xFF800000, plus 0x8000 fits.
    return np.uint16((b + 0x7FFF + ((b >> 16) & 1)) >> 16)


def store_out(arr, i, value):
    """arr[i] = value rounded to arr's dtype, exactly as elements.store."""
    raise NotImplementedError("only callable from Numba kernels")


@overload(store_out)
def _store_out(arr, i, value):
    if arr.dtype == types.uint16:
        def impl(arr, i, value):
            arr[i] = f32_to_bf16_fast(value)
        return impl

    def other(arr, i, value):
        store(arr, i, value)
    return other
