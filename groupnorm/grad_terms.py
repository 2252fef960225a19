"""Small (N, C) -> (C,) / (N, G) algebra that turns backward_reduce's sums into gradients.

Shared by the single-process backward and the sharded one (which all-reduces the (N, G)
sums in between), so every backend and both paths use the same formulas:

    dz1 = dL/dz1,  A[n, c] = sum_hw dz1 * xhat,  B[n, c] = sum_hw dz1,  k = 1 + scale
    dweight[c] = sum_n k * A          dbias[c] = sum_n k * B
    dscale[n, c] = w * A + b * B      dshift[n, c] = B
    sum_dxhat[n, g]      = sum_{c in g} w * k * B
    sum_dxhat_xhat[n, g] = sum_{c in g} w * k * A
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def _gain(weight: Optional[Tensor], scale: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    # w * (1 + scale) as (N, C) or (C,), in the sums' dtype; None when both are absent.
    g = None
    if scale is not None:
        g = 1.0 + scale.to(like.dtype)
    if weight is not None:
        w = weight.to(like.dtype)
        g = w if g is None else g * w
    return g


def group_sums(sum_dz_xhat: Tensor, sum_dz: Tensor, weight: Optional[Tensor], scale: Optional[Tensor],
               num_groups: int) -> Tuple[Tensor, Tensor]:
    """(sum_dxhat, sum_dxhat_xhat), each (N, G), the terms dx needs from its whole group."""
    n, c = sum_dz.shape
    g = _gain(weight, scale, sum_dz)
    a, b = (sum_dz_xhat, sum_dz) if g is None else (sum_dz_xhat * g, sum_dz * g)
    return b.reshape(n, num_groups, c // num_groups).sum(-1), a.reshape(n, num_groups, c // num_groups).sum(-1)


def param_grads(sum_dz_xhat: Tensor, sum_dz: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                scale: Optional[Tensor], shift: Optional[Tensor]):
    """(dweight, dbias, dscale, dshift) in their parameters' dtypes; None for absent ones."""
    k = None if scale is None else 1.0 + scale.to(sum_dz.dtype)
    a, b = (sum_dz_xhat, sum_dz) if k is None else (sum_dz_xhat * k, sum_dz * k)
    dweight = None if weight is None else a.sum(0).to(weight.dtype)
    dbias = None if bias is None else b.sum(0).to(bias.dtype)
    dscale = None
    if scale is not None:
        ds = sum_dz_xhat if weight is None else sum_dz_xhat * weight.to(sum_dz.dtype)
        if bias is not None:
            ds = ds + sum_dz * bias.to(sum_dz.dtype)
        dscale = ds.to(scale.dtype)
    dshift = None if shift is None else sum_dz.to(shift.dtype, copy=True)  # never alias sum_dz
    return dweight, dbias, dscale, dshift
