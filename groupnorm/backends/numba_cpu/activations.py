"""The fused epilogue's activations and derivatives as scalar Numba functions.

They follow ``groupnorm.epilogue`` term by term (mish's softplus has threshold 20). The
``*_block`` helpers branch on the activation once per block, not once per element, so
the element loops stay branch-free.

float32 staging buffers take vectorisable paths: PyPI's llvmlite has no SVML, so a libm
call (``math.exp``/``erf``/``tanh``/``log1p``) keeps a loop scalar at ~15-60 ns an element.
``exp_f32`` is exp without libm (a polynomial and exponent bits). GELU's forward uses a
rational erf (no exp), its derivative an erfc form sharing exp(-z^2/2) with the pdf;
GELU-tanh is z * sigmoid(2u); Mish's tanh(softplus(z)) is a rational function of exp(z).
Each float32 loop is straight arithmetic with min/max clamps, ~0.5-1.2 ns an element, and
stays within ~2e-7 * max(1, |z|) of the float64 ``activate``/``activate_grad`` (a few
ulps), with the limits at +-inf and NaN propagation. float64 buffers keep libm.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .bits import bits_to_f32

# The scalar float64 helpers and the block dispatchers state their flags: a Numba function
# that states none is compiled with the flags of whichever caller compiles it first in a
# process (``fastmath`` and ``error_model`` are inherited), and that specialisation is then
# reused, and cached on disk, for every caller (a caller's fast-math flags, say, or none). A cold
# pytest-xdist run saw the fused and two-stage backward disagree in the last bits of float64
# sums with silu and mish; these helpers were the functions on that path stating no flags.
SCALAR = dict(cache=True, error_model="numpy", fastmath={"nsz"})

# Activation codes, in the order of groupnorm.epilogue.ACTIVATIONS.
NONE, SILU, GELU, GELU_TANH, RELU, MISH = range(6)
CODES = {"none": NONE, "silu": SILU, "gelu": GELU, "gelu_tanh": GELU_TANH, "relu": RELU, "mish": MISH}

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
INV_SQRT_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = INV_SQRT_2 / math.sqrt(math.pi)
GELU_TANH_C = 0.044715
SOFTPLUS_THRESHOLD = 20.0


@njit(**SCALAR)
def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


@njit(**SCALAR)
def softplus(z):
    # Above the threshold softplus(z) == z in float32 (torch's convention).
    return z if z > SOFTPLUS_THRESHOLD else math.log1p(math.exp(z))


@njit(**SCALAR)
def activate(z, act):
    """act(z); computed in float64 so the float32 result is correctly rounded or close."""
    if act == SILU:
        return z * sigmoid(z)
    if act == GELU:
        return 0.5 * z * (1.0 + math.erf(z * INV_SQRT_2))
    if act == GELU_TANH:
        return 0.5 * z * (1.0 + math.tanh(SQRT_2_OVER_PI * (z + GELU_TANH_C * z * z * z)))
    if act == RELU:
        return z if not z <= 0.0 else 0.0   # NaN propagates like torch.clamp
    if act == MISH:
        return z * math.tanh(softplus(z))
    return z


@njit(**SCALAR)
def activate_grad(z, act):
    """d act(z) / dz, matching groupnorm.epilogue.activation_grad."""
    if act == SILU:
        s = sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if act == GELU:
        cdf = 0.5 * (1.0 + math.erf(z * INV_SQRT_2))
        return cdf + z * math.exp(-0.5 * z * z) * INV_SQRT_2PI
    if act == GELU_TANH:
        t = math.tanh(SQRT_2_OVER_PI * (z + GELU_TANH_C * z * z * z))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_C * z * z)
    if act == RELU:
        return 1.0 if z > 0.0 else 0.0
    if act == MISH:
        t = math.tanh(softplus(z))
        return t + z * (1.0 - t * t) * sigmoid(z)
    return 1.0


# Vectorisable float32 math: no libm calls, no branches in the element loops (min/max
# clamps select, they do not branch). No "contract": whether LLVM fuses a multiply-add
# depends on the loop a helper is inlined into, so fused results differed by caller (see
# docs/reliability.md, batch invariance).
VEC = dict(cache=True, error_model="numpy", fastmath={"nsz"})

# exp(x): k = round(x / ln2), r = x - k ln2 (two-part ln2), exp(r) by a degree-7 polynomial
# on |r| <= ln2/2 (truncation < 6e-9), 2^k assembled from exponent bits. <= 2 ulp of expf.
# Arguments clamp to [-88, 88]: at the top 2^k stays finite; below about -87.7, k = -127
# and 2^k's bits are all zero, so exp flushes to +0 (the callers rely on exact zeros to
# get finite limits at +-inf, e.g. gelu(-inf) = -0 rather than -inf * tiny).
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_LO = np.float32(-88.0)
_EXP_HI = np.float32(88.0)
_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
_HALF = np.float32(0.5)
_P2, _P3, _P4, _P5, _P6, _P7 = (np.float32(1.0 / math.factorial(i)) for i in range(2, 8))


@njit(**VEC)
def exp_f32(x):
    """exp(x) for a float32 x; a scalar helper that LLVM inlines and vectorises in loops."""
    x = min(max(x, _EXP_LO), _EXP_HI)     # max/min keep a NaN (Numba's compare order)
    k = np.floor(x * _LOG2E + _HALF)
    r = x - k * _LN2_HI - k * _LN2_LO
    poly = _ONE + r * (_ONE + r * (_P2 + r * (_P3 + r * (_P4 + r * (_P5 + r * (_P6 + r * _P7))))))
    return poly * bits_to_f32((np.int32(k) + np.int32(127)) << np.int32(23))


@njit(**VEC)
def exp_neg_f32(buf, count):
    """exp(-buf[:count]) as a new float32 array, in one straight vectorisable loop."""
    out = np.empty(count, np.float32)
    for j in range(count):
        out[j] = exp_f32(np.float32(-buf[j]))
    return out


_INF = np.float32(np.inf)


@njit(**VEC)
def exp_neg_or_inf_f32(z):
    """exp(-z), but +inf past exp's clamp (-z > 88), so z / (1 + e) is exactly -0 for a
    very negative finite z and NaN at z = -inf, as torch's silu gives."""
    t = np.float32(-z)
    return exp_f32(t) if t <= _EXP_HI else _INF


@njit(**VEC)
def silu_f32(buf, count):
    """buf[:count] = z * sigmoid(z) = z / (1 + exp(-z)), one straight pass."""
    for j in range(count):
        z = buf[j]
        buf[j] = z / (_ONE + exp_neg_or_inf_f32(z))


@njit(**VEC)
def silu_grad_f32(buf, count):
    """buf[:count] = sigmoid(z) * (1 + z * (1 - sigmoid(z))), with 1 - sigmoid(z) formed as
    e * sigmoid(z) (e = exp(-z)): no cancellation for large z, where z multiplies it."""
    for j in range(count):
        z = buf[j]
        e = exp_neg_or_inf_f32(z)
        sg = _ONE / (_ONE + e)
        one_minus = e * sg if sg > 0 else _ONE    # e = inf: sigmoid is 0, 1 - sigmoid is 1
        buf[j] = sg * (_ONE + z * one_minus)


# Limits at +-inf, as torch: the forward z * f(z) is +inf at +inf and NaN at -inf (f -> 0
# exactly: erf clamped to -1, exp flushed; -inf * 0), -0 for very negative finite z.
# Inside the derivatives z is clamped both ways, which also keeps z**3 finite; the
# derivative is then made NaN at +-inf, where torch's formulas give inf * 0.
_Z_CAP = np.float32(1.0e4)

# GELU forward: Phi(z) = 0.5 * (1 + erf(z / sqrt2)) with erf(x) = x P(x^2) / Q(x^2), a [5/5]
# rational fitted for this module (minimax absolute error 1.8e-8 on [0, 3.95]; all
# coefficients positive, so float32 Horner is stable; <= 3.8e-7 as evaluated). x is
# clamped to +-4.5, where the rational is past 1 + 1e-5, and the result to [-1, 1], so
# erf is exactly +-1 in the tails and gelu(z) is exactly z or -0 there. No exp: this is
# half the cost of the erfc form below, with torch's accuracy in err / |z| (~2e-7).
_ERF_X_MAX = np.float32(4.5)
_ERF_P0, _ERF_P1, _ERF_P2, _ERF_P3, _ERF_P4, _ERF_P5 = (np.float32(v) for v in (
    1.128379, 0.1940363, 0.053207144, 0.003917346, 0.00028760155, 2.0117407e-06))
_ERF_Q1, _ERF_Q2, _ERF_Q3, _ERF_Q4, _ERF_Q5 = (np.float32(v) for v in (
    0.5052917, 0.115591004, 0.015270756, 0.0011982082, 3.783974e-05))
_INV_SQRT2_F = np.float32(INV_SQRT_2)


@njit(**VEC)
def erf_f32(x):
    """erf(x) for a float32 x, absolute error <= 4e-7; NaN stays NaN."""
    x = min(max(x, -_ERF_X_MAX), _ERF_X_MAX)
    s = x * x
    p = _ERF_P0 + s * (_ERF_P1 + s * (_ERF_P2 + s * (_ERF_P3 + s * (_ERF_P4 + s * _ERF_P5))))
    q = _ONE + s * (_ERF_Q1 + s * (_ERF_Q2 + s * (_ERF_Q3 + s * (_ERF_Q4 + s * _ERF_Q5))))
    return min(max(x * p / q, -_ONE), _ONE)


_F32_MAX = np.float32(np.finfo(np.float32).max)
_NAN = np.float32(np.nan)


@njit(**VEC)
def finite_or_nan(z, g):
    """g where z is finite, NaN where z is +-inf or NaN (a select: the loops stay vector)."""
    return g if abs(z) <= _F32_MAX else _NAN


@njit(**VEC)
def gelu_f32(buf, count):
    """buf[:count] = z * Phi(z)."""
    for j in range(count):
        z = buf[j]
        buf[j] = z * (_HALF + _HALF * erf_f32(z * _INV_SQRT2_F))


# GELU gradient: Phi(z) + z phi(z) needs exp(-z^2/2) for phi anyway, so Phi takes the
# erfc form that shares it: with a = |z| / sqrt2 and h = 0.5 * erfc(a) = 0.5 * exp(-a^2)
# R(a), Phi = h for z < 0 (no 1 + erf cancellation) and 1 - h for z >= 0, picked by
# copysign (a bit operation, not a branch). R(a) = erfc(a) exp(a^2) is a [4/5] rational,
# minimax relative error 5e-9 on [0, 9.5] (fitted for this module; positive coefficients;
# ~3e-7 as evaluated in float32). exp(-a^2) is computed as exp(-z*z/2): one rounding.
_INV_SQRT_2PI_F = np.float32(INV_SQRT_2PI)
_ERFC_A_MAX = np.float32(9.5)             # exp(-a^2) is flushed to 0 before this
_R_P0, _R_P1, _R_P2, _R_P3, _R_P4 = (np.float32(v) for v in (
    1.0, 1.2331885, 0.7261459, 0.22662108, 0.0322526))
_R_Q1, _R_Q2, _R_Q3, _R_Q4, _R_Q5 = (np.float32(v) for v in (
    2.3615682, 2.3908818, 1.3151808, 0.40170446, 0.057165448))


@njit(**VEC)
def gelu_cdf_f32(z):
    """(Phi(z), exp(-z^2/2)) for a finite float32 z (the caller clamps to +-_Z_CAP)."""
    e = exp_f32(-_HALF * z * z)
    a = min(abs(z) * _INV_SQRT2_F, _ERFC_A_MAX)
    p = _R_P0 + a * (_R_P1 + a * (_R_P2 + a * (_R_P3 + a * _R_P4)))
    q = _ONE + a * (_R_Q1 + a * (_R_Q2 + a * (_R_Q3 + a * (_R_Q4 + a * _R_Q5))))
    h = _HALF * e * p / q
    sign = math.copysign(_ONE, z)
    return (_HALF + _HALF * sign) - sign * h, e


@njit(**VEC)
def gelu_grad_f32(buf, count):
    """buf[:count] = Phi(z) + z * phi(z)."""
    for j in range(count):
        raw = buf[j]
        z = min(max(raw, -_Z_CAP), _Z_CAP)
        cdf, e = gelu_cdf_f32(z)
        buf[j] = finite_or_nan(raw, cdf + z * e * _INV_SQRT_2PI_F)


# GELU-tanh: 0.5 * (1 + tanh(u)) = sigmoid(2u) = E / (1 + E) with E = exp(2u), so
# gelu_tanh(z) = z * E / (1 + E): no 1 - 2/(1 + e^2u) cancellation near 0 or for u < 0.
# E flushes to 0 (u -> -inf) or saturates at e^88 (E / (1 + E) == 1), and in the
# derivative 1 - tanh^2 = 4 s (1 - s) uses 1 - s = 1 / (1 + E), exact in relative terms.
_TWO_C1 = np.float32(2.0 * SQRT_2_OVER_PI)
_TWO_C3 = np.float32(2.0 * SQRT_2_OVER_PI * GELU_TANH_C)
_THREE_C = np.float32(3.0 * GELU_TANH_C)
_C1 = np.float32(SQRT_2_OVER_PI)


@njit(**VEC)
def gelu_tanh_f32(buf, count):
    """buf[:count] = z * sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3)."""
    for j in range(count):
        z = buf[j]
        e = exp_f32(z * (_TWO_C1 + _TWO_C3 * z * z))
        buf[j] = z * (e / (_ONE + e))


@njit(**VEC)
def gelu_tanh_grad_f32(buf, count):
    """buf[:count] = s + 2 z s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 z^2), s = sigmoid(2u)."""
    for j in range(count):
        raw = buf[j]
        z = min(max(raw, -_Z_CAP), _Z_CAP)
        z2 = z * z
        e = exp_f32(z * (_TWO_C1 + _TWO_C3 * z2))
        d = _ONE + e
        s = e / d
        buf[j] = finite_or_nan(raw, s + _TWO * z * (s * (_ONE / d)) * _C1 * (_ONE + _THREE_C * z2))


# Mish: with e = exp(z) and n = e (e + 2), tanh(log1p(e)) = n / (n + 2): no log, and no
# cancellation for z < 0 (both n and n + 2 are sums of positives). Above softplus's
# threshold 20, n / (n + 2) rounds to exactly 1 in float32, so z is clamped to 20 for e
# instead of branching. The derivative t + z (1 - t^2) sigmoid(z) simplifies to
# t + 4 z e (1 + e) / (n + 2)^2.
_SOFTPLUS_HI = np.float32(SOFTPLUS_THRESHOLD)
_FOUR = np.float32(4.0)


@njit(**VEC)
def mish_f32(buf, count):
    """buf[:count] = z * tanh(softplus(z))."""
    for j in range(count):
        z = buf[j]
        e = exp_f32(min(max(z, -_Z_CAP), _SOFTPLUS_HI))
        n = e * (e + _TWO)
        buf[j] = z * (n / (n + _TWO))


@njit(**VEC)
def mish_grad_f32(buf, count):
    """buf[:count] = d mish / dz."""
    for j in range(count):
        raw = buf[j]
        z = min(max(raw, -_Z_CAP), _SOFTPLUS_HI)   # above 20 the second term is < 1e-15
        e = exp_f32(z)
        n = e * (e + _TWO)
        d = n + _TWO
        w = _ONE / d
        buf[j] = finite_or_nan(raw, n / d + _FOUR * z * (e * w) * ((_ONE + e) * w))


@njit(**SCALAR)
def activate_block(buf, count, act):
    """buf[:count] = act(buf[:count]); one branch per block keeps the loops tight. float32
    staging takes the vectorised loops; float64 keeps the scalar libm ``activate``."""
    if act == RELU:
        for j in range(count):
            v = buf[j]
            buf[j] = v if not v <= 0 else 0.0
    elif buf.itemsize == 4 and act == SILU:
        silu_f32(buf, count)
    elif buf.itemsize == 4 and act == GELU:
        gelu_f32(buf, count)
    elif buf.itemsize == 4 and act == GELU_TANH:
        gelu_tanh_f32(buf, count)
    elif buf.itemsize == 4 and act == MISH:
        mish_f32(buf, count)
    else:
        for j in range(count):
            buf[j] = activate(buf[j], act)


@njit(**SCALAR)
def grad_block(buf, count, act):
    """buf[:count] = act'(buf[:count]) (buf holds z1 on entry); loops chosen as in
    activate_block."""
    if act == RELU:
        for j in range(count):
            buf[j] = 1.0 if buf[j] > 0 else 0.0
    elif buf.itemsize == 4 and act == SILU:
        silu_grad_f32(buf, count)
    elif buf.itemsize == 4 and act == GELU:
        gelu_grad_f32(buf, count)
    elif buf.itemsize == 4 and act == GELU_TANH:
        gelu_tanh_grad_f32(buf, count)
    elif buf.itemsize == 4 and act == MISH:
        mish_grad_f32(buf, count)
    else:
        for j in range(count):
            buf[j] = activate_grad(buf[j], act)
