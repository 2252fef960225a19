"""Fused epilogue definitions: the activations and their derivatives, in torch ops.

The order of the epilogue is fixed everywhere (reference, Numba, Triton):

    z0 = (x - mean) * rstd * weight + bias        # the plain GroupNorm output
    z1 = z0 * (1 + scale[n, c]) + shift[n, c]     # per-sample scale/shift, when given
    y  = act(z1)                                  # activation, when given

These torch versions are the oracle for the kernels and the fallback path.
"""
from __future__ import annotations

import math

import torch

ACTIVATIONS = ("none", "silu", "gelu", "gelu_tanh", "relu", "mish")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_GELU_TANH_C = 0.044715


def activation_name(activation) -> str:
    """Normalise the user's activation argument (None or a name) to the op-level string."""
    if activation is None:
        return "none"
    if not isinstance(activation, str):
        raise TypeError(f"activation must be None or one of {ACTIVATIONS[1:]}, got {activation!r}")
    name = activation.lower()
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {ACTIVATIONS[1:]}, got {activation!r}")
    return name


def _softplus(z: torch.Tensor) -> torch.Tensor:
    # torch.nn.functional.softplus threshold 20: above it softplus(z) == z in float32.
    return torch.where(z > 20.0, z, torch.log1p(torch.exp(torch.clamp(z, max=20.0))))


def apply_activation(z: torch.Tensor, activation: str) -> torch.Tensor:
    """act(z) for the named activation (z already in the accumulation dtype)."""
    if activation == "none":
        return z
    if activation == "silu":
        return z * torch.sigmoid(z)
    if activation == "gelu":
        return 0.5 * z * (1.0 + torch.erf(z * _INV_SQRT_2))
    if activation == "gelu_tanh":
        return 0.5 * z * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z)))
    if activation == "relu":
        return torch.clamp(z, min=0.0)
    if activation == "mish":
        return z * torch.tanh(_softplus(z))
    raise ValueError(f"unknown activation {activation!r}")


def activation_grad(z: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(z) / dz, used by the backward to turn dy into dz1 without saving z1."""
    if activation == "none":
        return torch.ones_like(z)
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * _INV_SQRT_2))
        pdf = torch.exp(-0.5 * z * z) * (_INV_SQRT_2 / math.sqrt(math.pi))
        return cdf + z * pdf
    if activation == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z)
        t = torch.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * z * z)
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "mish":
        t = torch.tanh(_softplus(z))
        return t + z * (1.0 - t * t) * torch.sigmoid(z)
    raise ValueError(f"unknown activation {activation!r}")


def torch_activation(activation: str):
    """The torch.nn.functional op a user would compose by hand (the unfused peer)."""
    import torch.nn.functional as F

    return {
        "none": lambda t: t,
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "relu": F.relu,
        "mish": F.mish,
    }[activation]
