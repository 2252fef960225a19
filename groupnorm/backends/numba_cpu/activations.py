"""The fused epilogue's activations and derivatives as scalar Numba functions.

They follow ``groupnorm.epilogue`` term by term (mish's softplus has threshold 20). The
``*_block`` helpers branch on the activation once per block, not once per element, so
the element loops stay branch-free.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

# Activation codes, in the order of groupnorm.epilogue.ACTIVATIONS.
NONE, SILU, GELU, GELU_TANH, RELU, MISH = range(6)
CODES = {"none": NONE, "silu": SILU, "gelu": GELU, "gelu_tanh": GELU_TANH, "relu": RELU, "mish": MISH}

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
INV_SQRT_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = INV_SQRT_2 / math.sqrt(math.pi)
GELU_TANH_C = 0.044715
SOFTPLUS_THRESHOLD = 20.0


@njit(cache=True)
def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


@njit(cache=True)
def softplus(z):
    # Above the threshold softplus(z) == z in float32 (torch's convention).
    return z if z > SOFTPLUS_THRESHOLD else math.log1p(math.exp(z))


@njit(cache=True)
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


@njit(cache=True)
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


# float32 exp(-z) without libm (PyPI's llvmlite has no SVML, so math.exp never vectorises):
# k = round(-z / ln2), r = -z - k ln2 (two-part ln2), exp(r) by a degree-7 polynomial on
# |r| <= ln2/2 (truncation < 6e-9), 2^k assembled from exponent bits. <= 2 ulp of expf.
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_LO = np.float32(-87.0)   # keeps 2^k a normal float32
_EXP_HI = np.float32(88.0)
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)
_P2, _P3, _P4, _P5, _P6, _P7 = (np.float32(1.0 / math.factorial(i)) for i in range(2, 8))


@njit(cache=True, error_model="numpy", fastmath={"contract", "nsz"})
def exp_neg_f32(buf, count):
    """exp(-buf[:count]) as a new float32 array, in straight vectorisable loops."""
    bits = np.empty(count, np.int32)
    poly = np.empty(count, np.float32)
    for j in range(count):
        z = min(max(np.float32(-buf[j]), _EXP_LO), _EXP_HI)
        k = np.floor(z * _LOG2E + _HALF)
        r = z - k * _LN2_HI - k * _LN2_LO
        poly[j] = _ONE + r * (_ONE + r * (_P2 + r * (_P3 + r * (_P4 + r * (_P5 + r * (_P6 + r * _P7))))))
        bits[j] = (np.int32(k) + np.int32(127)) << np.int32(23)
    scale = bits.view(np.float32)
    for j in range(count):
        poly[j] *= scale[j]
    return poly


@njit(cache=True)
def activate_block(buf, count, act):
    """buf[:count] = act(buf[:count]); one branch per block keeps the loops tight."""
    if act == RELU:
        for j in range(count):
            v = buf[j]
            buf[j] = v if not v <= 0 else 0.0
    elif act == SILU and buf.itemsize == 4:   # float32 staging: vectorised sigmoid
        e = exp_neg_f32(buf, count)
        for j in range(count):
            buf[j] = buf[j] / (_ONE + e[j])
    elif act == SILU:
        for j in range(count):
            buf[j] = activate(buf[j], SILU)
    elif act == GELU:
        for j in range(count):
            buf[j] = activate(buf[j], GELU)
    elif act == GELU_TANH:
        for j in range(count):
            buf[j] = activate(buf[j], GELU_TANH)
    elif act == MISH:
        for j in range(count):
            buf[j] = activate(buf[j], MISH)


@njit(cache=True)
def grad_block(buf, count, act):
    """buf[:count] = act'(buf[:count]) (buf holds z1 on entry)."""
    if act == RELU:
        for j in range(count):
            buf[j] = 1.0 if buf[j] > 0 else 0.0
    elif act == SILU and buf.itemsize == 4:
        e = exp_neg_f32(buf, count)
        for j in range(count):
            sg = _ONE / (_ONE + e[j])
            buf[j] = sg * (_ONE + buf[j] * (_ONE - sg))
    elif act == SILU:
        for j in range(count):
            buf[j] = activate_grad(buf[j], SILU)
    elif act == GELU:
        for j in range(count):
            buf[j] = activate_grad(buf[j], GELU)
    elif act == GELU_TANH:
        for j in range(count):
            buf[j] = activate_grad(buf[j], GELU_TANH)
    elif act == MISH:
        for j in range(count):
            buf[j] = activate_grad(buf[j], MISH)
    else:
        for j in range(count):
            buf[j] = 1.0
