"""The fused epilogue's activations and derivatives as scalar Numba functions.

They follow ``groupnorm.epilogue`` term by term (mish's softplus has threshold 20). The
``*_block`` helpers branch on the activation once per block, not once per element, so
the element loops stay branch-free.
"""
from __future__ import annotations

import math

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


@njit(cache=True)
def activate_block(buf, count, act):
    """buf[:count] = act(buf[:count]); one branch per block keeps the loops tight."""
    if act == RELU:
        for j in range(count):
            v = buf[j]
            buf[j] = v if not v <= 0 else 0.0
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
