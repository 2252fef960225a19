"""Triton versions of the fused epilogue (see ``groupnorm/epilogue.py``), shared by kernels.

    z0 = xhat * weight[c] + bias[c]
    z1 = z0 * (1 + scale[n, c]) + shift[n, c]
    y  = act(z1)

Each piece is switched on by a constexpr flag, the activation by a constexpr code, so one
kernel body serves every fusion. Only tl.exp / tl.sqrt / tl.math.erf are used (present in
Triton 3.6 and in the interpreter); tanh is built from exp.
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

# Activation codes, the ACTIVATION constexpr of every kernel.
ACT_NONE, ACT_SILU, ACT_GELU, ACT_GELU_TANH, ACT_RELU, ACT_MISH = 0, 1, 2, 3, 4, 5
ACTIVATION_CODES = {"none": ACT_NONE, "silu": ACT_SILU, "gelu": ACT_GELU,
                    "gelu_tanh": ACT_GELU_TANH, "relu": ACT_RELU, "mish": ACT_MISH}

_INV_SQRT_2 = tl.constexpr(1.0 / math.sqrt(2.0))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
_GELU_TANH_C = tl.constexpr(0.044715)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(u):
    # tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|) <= 1: never overflows.
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def _tanh_softplus(z):
    # tanh(log(1 + e^z)) = e^z (e^z + 2) / (e^z (e^z + 2) + 2): no cancellation for z << 0.
    # Clamped at 20, where it is 1 to within 1e-17 (softplus(z) == z there, as in torch).
    e = tl.exp(tl.minimum(z, 20.0))
    p = e * (e + 2.0)
    return p / (p + 2.0), 2.0 / (p + 2.0)  # (t, 1 - t)


@triton.jit
def activation(z, ACTIVATION: tl.constexpr):
    """act(z), z in the accumulation dtype."""
    if ACTIVATION == 1:  # silu
        z = z * _sigmoid(z)
    elif ACTIVATION == 2:  # gelu (erf)
        z = 0.5 * z * (1.0 + tl.math.erf(z * _INV_SQRT_2))
    elif ACTIVATION == 3:  # gelu_tanh
        z = 0.5 * z * (1.0 + _tanh((z + z * z * z * _GELU_TANH_C) * _SQRT_2_OVER_PI))
    elif ACTIVATION == 4:  # relu
        z = tl.where(z > 0, z, 0.0)
    elif ACTIVATION == 5:  # mish
        t, _ = _tanh_softplus(z)
        z = z * t
    return z


@triton.jit
def activation_grad(z, ACTIVATION: tl.constexpr):
    """d act(z) / dz (ACTIVATION != 0; the callers skip the multiply for 'none')."""
    if ACTIVATION == 1:  # silu: s (1 + z (1 - s))
        s = _sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == 2:  # gelu: Phi(z) + z phi(z)
        cdf = 0.5 * (1.0 + tl.math.erf(z * _INV_SQRT_2))
        g = cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    elif ACTIVATION == 3:  # gelu_tanh: 0.5 (1 + t) + 0.5 z (1 - t^2) k (1 + 3 c z^2)
        t = _tanh((z + z * z * z * _GELU_TANH_C) * _SQRT_2_OVER_PI)
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + z * z * (3.0 * _GELU_TANH_C))
    elif ACTIVATION == 4:  # relu
        g = tl.where(z > 0, 1.0, 0.0).to(z.dtype)
    else:  # mish: t + z (1 - t^2) sigmoid(z), 1 - t^2 = (1 - t)(1 + t)
        t, one_minus_t = _tanh_softplus(z)
        g = t + z * (one_minus_t * (1.0 + t)) * _sigmoid(z)
    return g


@triton.jit
def pre_activation(xhat, n, c, mask, C,
                   w_ptr,      # (C,) weight
                   b_ptr,      # (C,) bias
                   scale_ptr,  # (N, C) per-sample scale, contiguous
                   shift_ptr,  # (N, C) per-sample shift, contiguous
                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """z1 from xhat; ``n`` is a scalar (int64) sample index, ``c`` the channel of each element."""
    z = xhat
    if HAS_WEIGHT:
        z = z * tl.load(w_ptr + c, mask=mask, other=0.0).to(xhat.dtype)
    if HAS_BIAS:
        z = z + tl.load(b_ptr + c, mask=mask, other=0.0).to(xhat.dtype)
    if HAS_SCALE:
        z = z * (1.0 + tl.load(scale_ptr + n * C + c, mask=mask, other=0.0).to(xhat.dtype))
    if HAS_SHIFT:
        z = z + tl.load(shift_ptr + n * C + c, mask=mask, other=0.0).to(xhat.dtype)
    return z


@triton.jit
def dxhat_factor(dz, n, c, mask, C,
                 w_ptr,      # (C,) weight
                 scale_ptr,  # (N, C) per-sample scale, contiguous
                 HAS_WEIGHT: tl.constexpr, HAS_SCALE: tl.constexpr):
    """dxhat = dz1 * (1 + scale[n, c]) * weight[c]."""
    d = dz
    if HAS_SCALE:
        d = d * (1.0 + tl.load(scale_ptr + n * C + c, mask=mask, other=0.0).to(dz.dtype))
    if HAS_WEIGHT:
        d = d * tl.load(w_ptr + c, mask=mask, other=0.0).to(dz.dtype)
    return d


@triton.jit
def group_offsets(i, C, HW, CPG: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Flat index ``i`` (int32) of a group's elements in memory order -> (offset, channel).

    The offset is relative to the group's first element (int64); the channel is relative to
    the group's first channel. NCHW: a group is one contiguous run of CPG * HW elements.
    Channels-last: HW runs of CPG contiguous channels, C apart.
    """
    if CHANNELS_LAST:
        c_local = i % CPG
        offs = (i // CPG).to(tl.int64) * C + c_local
    else:
        c_local = i // HW
        offs = i.to(tl.int64)
    return offs, c_local
