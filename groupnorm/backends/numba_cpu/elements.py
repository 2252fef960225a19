"""Typed element access: one load/store spelling for float32, float64, bf16 and f16 arrays.

Kernels are written once; Numba picks the conversion from the array's element type at
compile time (float arrays pass through, uint16 is bfloat16, int16 is float16), so each
dtype gets its own specialised machine code with no runtime branch.
"""
from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload

from .bits import bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16


def load(arr, i):
    """arr[i] widened to the accumulation dtype (float32, or float64 for float64 arrays)."""
    raise NotImplementedError("only callable from Numba kernels")


def store(arr, i, value):
    """arr[i] = value, rounded to the array's dtype (round to nearest even)."""
    raise NotImplementedError("only callable from Numba kernels")


def cast_like(value, like):
    """value converted to the float type of ``like`` (keeps float32 math in float32)."""
    raise NotImplementedError("only callable from Numba kernels")


@overload(load)
def _load(arr, i):
    dtype = arr.dtype
    if dtype in (types.float32, types.float64):
        return lambda arr, i: arr[i]
    if dtype == types.uint16:
        return lambda arr, i: bf16_to_f32(arr[i])
    if dtype == types.int16:
        return lambda arr, i: f16_to_f32(arr[i])
    return None


@overload(store)
def _store(arr, i, value):
    dtype = arr.dtype
    if dtype == types.float32:
        def impl(arr, i, value):
            arr[i] = np.float32(value)
    elif dtype == types.float64:
        def impl(arr, i, value):
            arr[i] = np.float64(value)
    elif dtype == types.uint16:
        def impl(arr, i, value):
            arr[i] = f32_to_bf16(value)
    elif dtype == types.int16:
        def impl(arr, i, value):
            arr[i] = f32_to_f16(value)
    else:
        return None
    return impl


@overload(cast_like)
def _cast_like(value, like):
    if like == types.float32:
        return lambda value, like: np.float32(value)
    if like == types.float64:
        return lambda value, like: np.float64(value)
    return None
