"""Pure-PyTorch GroupNorm: the fallback where no kernel exists and the oracle in tests.

Every function here follows the backend contract (see ``groupnorm/backends/__init__.py``),
so the registry can hand it out like any kernel backend. Statistics use a shifted two-pass
(mean first, then the sum of squared deviations), never E[x^2] - E[x]^2, so inputs with a
large mean keep their precision. Arithmetic runs in float64 whatever the input dtype (this
is the fallback and the oracle: accuracy over speed); statistics are returned in the
contract's dtype (float32, float64 for float64 inputs) and the output is rounded to the
input dtype once, at the end.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .epilogue import activation_grad, apply_activation

Tensor = torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Internal arithmetic dtype of the reference.
COMPUTE = torch.float64


def _spatial(x: Tensor) -> int:
    """HW, the product of the dims after C: reshapes spell it out, since -1 is ambiguous
    for an empty batch (N = 0)."""
    hw = 1
    for s in x.shape[2:]:
        hw *= int(s)
    return hw


def _group_len(x: Tensor, num_groups: int) -> int:
    return x.shape[1] // num_groups * _spatial(x)


def _grouped(x: Tensor, num_groups: int) -> Tensor:
    # (N, C, *) -> (N, G, C/G * HW) in logical NCHW order, in float64.
    return x.reshape(x.shape[0], num_groups, _group_len(x, num_groups)).to(COMPUTE)


def _per_channel(x: Tensor) -> Tensor:
    # (N, C, *) -> (N, C, HW) in float64.
    return x.reshape(x.shape[0], x.shape[1], _spatial(x)).to(COMPUTE)


def _param(t: Optional[Tensor], acc: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(acc)


def _moments64(x: Tensor, num_groups: int) -> Tuple[Tensor, Tensor, int]:
    # Shifted two-pass in float64: (mean, m2, count per group).
    xg = _grouped(x, num_groups)
    if xg.shape[-1] == 0:
        zeros = x.new_zeros(xg.shape[:2], dtype=COMPUTE)
        return zeros, zeros.clone(), 0
    mean = xg.mean(dim=-1)
    return mean, (xg - mean.unsqueeze(-1)).square().sum(dim=-1), xg.shape[-1]


def stats(x: Tensor, num_groups: int) -> Tuple[Tensor, Tensor]:
    """Per-(n, g) mean and m2 = sum((x - mean)^2), each (N, G), in the statistics dtype."""
    mean, m2, _ = _moments64(x, num_groups)
    acc = acc_dtype(x.dtype)
    return mean.to(acc), m2.to(acc)


def rstd_from_m2(m2: Tensor, count: int, eps: float) -> Tensor:
    """1 / sqrt(m2 / count + eps): biased variance, eps inside the square root."""
    return torch.rsqrt(m2 / max(count, 1) + eps)


def _normalized(x: Tensor, mean: Tensor, rstd: Tensor, num_groups: int) -> Tensor:
    # xhat as (N, C, HW) in the accumulation dtype.
    n, c = x.shape[0], x.shape[1]
    xg = _grouped(x, num_groups)
    xhat = (xg - mean.to(xg.dtype).unsqueeze(-1)) * rstd.to(xg.dtype).unsqueeze(-1)
    return xhat.reshape(n, c, _spatial(x))


def _pre_activation(xhat, weight, bias, scale, shift):
    # z0 = xhat * w + b ; z1 = z0 * (1 + scale) + shift. Returns (z0, z1), (N, C, HW).
    acc = xhat.dtype
    z0 = xhat
    if weight is not None:
        z0 = z0 * _param(weight, acc)[None, :, None]
    if bias is not None:
        z0 = z0 + _param(bias, acc)[None, :, None]
    z1 = z0
    if scale is not None:
        z1 = z1 * (1.0 + _param(scale, acc)[:, :, None])
    if shift is not None:
        z1 = z1 + _param(shift, acc)[:, :, None]
    return z0, z1


def _like_input(values: Tensor, x: Tensor) -> Tensor:
    # Write (N, C, HW) values into a tensor with x's shape, dtype and memory format.
    out = torch.empty_like(x)
    out.copy_(values.reshape(x.shape))
    return out


def apply(x, mean, rstd, weight, bias, scale, shift, num_groups: int, activation: str) -> Tensor:
    """Normalise with given statistics, then affine, scale/shift and activation."""
    _, z1 = _pre_activation(_normalized(x, mean, rstd, num_groups), weight, bias, scale, shift)
    return _like_input(apply_activation(z1, activation), x)


def forward(x, weight, bias, scale, shift, num_groups: int, eps: float, activation: str):
    """(y, mean, rstd): the whole forward, statistics then apply (float64 throughout; the
    returned statistics are rounded to the contract's dtype after use)."""
    mean, m2, count = _moments64(x, num_groups)
    rstd = rstd_from_m2(m2, count, eps)
    y = apply(x, mean, rstd, weight, bias, scale, shift, num_groups, activation)
    acc = acc_dtype(x.dtype)
    return y, mean.to(acc), rstd.to(acc)


def _grad_pre_activation(dy, x, mean, rstd, weight, bias, scale, shift, num_groups, activation):
    # (xhat, dz1) as (N, C, HW): dz1 = dL/dz1, recomputing z1 from x and the statistics.
    xhat = _normalized(x, mean, rstd, num_groups)
    dz1 = _per_channel(dy).to(xhat.dtype)
    if activation != "none":
        _, z1 = _pre_activation(xhat, weight, bias, scale, shift)
        dz1 = dz1 * activation_grad(z1, activation)
    return xhat, dz1


def backward_reduce(dy, x, mean, rstd, weight, bias, scale, shift, num_groups: int, activation: str):
    """Per-(n, c) sums over the spatial positions: (sum(dz1 * xhat), sum(dz1)), each (N, C)."""
    xhat, dz1 = _grad_pre_activation(dy, x, mean, rstd, weight, bias, scale, shift, num_groups, activation)
    acc = acc_dtype(x.dtype)
    return (dz1 * xhat).sum(dim=-1).to(acc), dz1.sum(dim=-1).to(acc)


def backward_dx(dy, x, mean, rstd, weight, bias, scale, shift, sum_dxhat, sum_dxhat_xhat,
                count: int, num_groups: int, activation: str) -> Tensor:
    """dx = rstd * (dxhat - sum_dxhat / count - xhat * sum_dxhat_xhat / count), per group.

    dxhat = dz1 * (1 + scale) * weight; the two (N, G) sums come from ``backward_reduce``
    (possibly all-reduced across ranks) and ``count`` is the global element count per group.
    """
    xhat, dz1 = _grad_pre_activation(dy, x, mean, rstd, weight, bias, scale, shift, num_groups, activation)
    acc = xhat.dtype
    dxhat = dz1
    if scale is not None:
        dxhat = dxhat * (1.0 + _param(scale, acc)[:, :, None])
    if weight is not None:
        dxhat = dxhat * _param(weight, acc)[None, :, None]
    n, c = x.shape[0], x.shape[1]
    dxhat_g = dxhat.reshape(n, num_groups, _group_len(x, num_groups))
    xhat_g = xhat.reshape(n, num_groups, _group_len(x, num_groups))
    inv_count = 1.0 / max(count, 1)
    dx = rstd.to(acc).unsqueeze(-1) * (
        dxhat_g
        - (sum_dxhat.to(acc) * inv_count).unsqueeze(-1)
        - xhat_g * (sum_dxhat_xhat.to(acc) * inv_count).unsqueeze(-1)
    )
    return _like_input(dx, x)


def differentiable_group_norm(x, weight, bias, scale, shift, num_groups: int, eps: float, activation: str):
    """The whole layer as differentiable torch ops (for double backward and as a test oracle)."""
    xg = x.reshape(x.shape[0], num_groups, _group_len(x, num_groups))
    mean = xg.mean(dim=-1, keepdim=True)
    var = (xg - mean).square().mean(dim=-1, keepdim=True)
    xhat = ((xg - mean) * torch.rsqrt(var + eps)).reshape(x.shape[0], x.shape[1], _spatial(x))
    _, z1 = _pre_activation(xhat, weight, bias, scale, shift)
    return apply_activation(z1, activation).reshape(x.shape)
