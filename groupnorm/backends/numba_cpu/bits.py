"""float16 / bfloat16 <-> float32 by bit manipulation, usable inside Numba kernels.

Half tensors reach the kernels as integer views (bfloat16 as uint16, float16 as int16)
so nothing is copied; these scalar functions widen on load and round on store. All bit
arithmetic runs in int64 (Numba's default int) and is reinterpreted as float32 through
two tiny LLVM intrinsics, so the conversions are exact and vectorisable.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

F32_EXP_MASK = 0x7F800000
F32_ABS_MASK = 0x7FFFFFFF
BF16_QNAN = 0x7FC0            # the canonical quiet NaN torch writes for bfloat16
F16_QNAN = 0x7E00             # float16 quiet-NaN exponent + quiet bit (sign kept)
F32_QUIET_BIT = 0x00400000
F16_INF = 0x7C00
F16_OVERFLOW = 0x477FF000     # |x| >= 65520 (halfway past the largest half) rounds to inf
F16_MIN_NORMAL_AS_F32 = 0x38800000   # 2**-14
F16_REBIAS = (127 - 15) << 23
HALF_F32_BITS = 0x3F000000    # 0.5f: adding it rounds a tiny value to a half subnormal
F16_SUBNORMAL_UNIT = 2.0 ** -24


@intrinsic
def bits_to_f32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if bits.bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif bits.bitwidth < 32:
            value = builder.zext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def f32_to_bits(typingctx, value):
    """The float32's bit pattern as a non-negative int64."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        raw = builder.bitcast(args[0], ir.IntType(32))
        return builder.zext(raw, ir.IntType(64))

    return types.int64(value), codegen


@njit(cache=True, error_model="numpy", fastmath=False)
def bf16_to_f32(h):
    """bfloat16 bits -> float32: the bf16 pattern is the top half of the float32 one."""
    return bits_to_f32((np.int64(h) & 0xFFFF) << 16)


@njit(cache=True, error_model="numpy", fastmath=False)
def f32_to_bf16(x):
    """float32 -> bfloat16 bits, round to nearest even; NaN becomes the canonical quiet NaN."""
    b = f32_to_bits(np.float32(x))
    if (b & F32_ABS_MASK) > F32_EXP_MASK:
        return np.uint16(BF16_QNAN)
    # Adding 0x7FFF plus the lowest kept bit rounds ties to even; a carry into the exponent
    # is the correct rounding up (to the next binade or to inf).
    return np.uint16((b + 0x7FFF + ((b >> 16) & 1)) >> 16)


@njit(cache=True, error_model="numpy", fastmath=False)
def f16_to_f32(h):
    """float16 bits -> float32, exact for normals, subnormals, zeros, inf and NaN."""
    u = np.int64(h) & 0xFFFF
    sign = (u & 0x8000) << 16
    exponent = (u >> 10) & 0x1F
    mantissa = u & 0x3FF
    if exponent == 0x1F:                  # inf / NaN: keep the payload, quiet a NaN (as torch)
        quiet = F32_QUIET_BIT if mantissa else 0
        return bits_to_f32(sign | F32_EXP_MASK | quiet | (mantissa << 13))
    if exponent != 0:                     # normal: rebias the exponent
        return bits_to_f32(sign | ((exponent << 23) + F16_REBIAS) | (mantissa << 13))
    # zero or subnormal: mantissa * 2**-24 is exact in float32
    magnitude = np.float32(mantissa) * np.float32(F16_SUBNORMAL_UNIT)
    return -magnitude if sign else magnitude


@njit(cache=True, error_model="numpy", fastmath=False)
def f32_to_f16(x):
    """float32 -> float16 bits, round to nearest even, overflow to inf, NaN kept quiet."""
    b = f32_to_bits(np.float32(x))
    sign = (b >> 16) & 0x8000
    a = b & F32_ABS_MASK
    if a > F32_EXP_MASK:                  # NaN: keep the top payload bits, quieted (as torch)
        out = F16_QNAN | ((a >> 13) & 0x3FF)
    elif a >= F16_OVERFLOW:
        out = F16_INF
    elif a >= F16_MIN_NORMAL_AS_F32:
        # Drop 13 mantissa bits, ties to even; a carry rolls into the exponent correctly.
        out = (a - F16_REBIAS + 0xFFF + ((a >> 13) & 1)) >> 13
    else:
        # Subnormal or zero: the float add of 0.5 rounds (to nearest even) at 2**-24.
        out = f32_to_bits(bits_to_f32(a) + bits_to_f32(HALF_F32_BITS)) - HALF_F32_BITS
    return np.int16(np.int64(sign | out) - ((sign | out) >> 15 << 16))


@njit(cache=True, error_model="numpy", fastmath=False)
def bf16_bits_to_f32_array(h):
    """Vector form of bf16_to_f32 (uint16 array in, float32 array out), for tests."""
    out = np.empty(h.size, np.float32)
    for i in range(h.size):
        out[i] = bf16_to_f32(h[i])
    return out


@njit(cache=True, error_model="numpy", fastmath=False)
def f32_to_bf16_bits_array(x):
    """Vector form of f32_to_bf16, for tests."""
    out = np.empty(x.size, np.uint16)
    for i in range(x.size):
        out[i] = f32_to_bf16(x[i])
    return out


@njit(cache=True, error_model="numpy", fastmath=False)
def f16_bits_to_f32_array(h):
    """Vector form of f16_to_f32 (int16 array in), for tests."""
    out = np.empty(h.size, np.float32)
    for i in range(h.size):
        out[i] = f16_to_f32(h[i])
    return out


@njit(cache=True, error_model="numpy", fastmath=False)
def f32_to_f16_bits_array(x):
    """Vector form of f32_to_f16 (int16 array out), for tests."""
    out = np.empty(x.size, np.int16)
    for i in range(x.size):
        out[i] = f32_to_f16(x[i])
    return out
