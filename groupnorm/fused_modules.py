"""Modules for the fused epilogues of diffusion models (GroupNorm -> SiLU, per-call scale/shift)."""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from .functional import group_norm
from .modules import GroupNorm

Tensor = torch.Tensor


class GroupNormAct(GroupNorm):
    """GroupNorm followed by an activation (SiLU by default) in one pass over the input.

    Same parameters and ``state_dict`` keys as ``torch.nn.GroupNorm``, so the norm of a
    ``Sequential(GroupNorm, SiLU)`` loads into it unchanged.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, activation: str = "silu", **kwargs) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, activation=activation, **kwargs)


class GroupNormScaleShift(GroupNorm):
    """GroupNorm with a per-sample scale/shift supplied at each call (time or class embedding).

    ``forward(x, scale, shift)`` computes ``act((norm(x) * weight + bias) * (1 + scale) + shift)``
    with ``scale``/``shift`` of shape (N, C), fused into the same pass. The embedding
    projection stays with the model (diffusers' ResnetBlock2D "scale_shift" does
    ``scale, shift = emb.chunk(2, dim=1)`` before calling this); the default ``affine=False``
    matches that use, where the embedding supplies the modulation.

    Not diffusers' ``AdaGroupNorm`` (which owns the embedding projection): to fuse one of
    those, ``groupnorm.convert(model, fuse=True)`` (see docs/fusion.md).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = False,
                 device=None, dtype=None, *, activation: Optional[str] = None, **kwargs) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, activation=activation, **kwargs)

    def forward(self, input: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
        scale, shift = (_per_sample(t, input) for t in (scale, shift))
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps,
                          activation=self.activation, scale=scale, shift=shift, process_group=self.process_group)


_DIFFUSERS_ARGS = ("embedding_dim", "out_dim", "act_fn")


class AdaGroupNorm(GroupNormScaleShift):
    """Deprecated name of ``GroupNormScaleShift`` (same arguments).

    It collided with diffusers' ``AdaGroupNorm(embedding_dim, out_dim, num_groups, act_fn,
    eps)``: ``AdaGroupNorm(16, 32, 8)`` built a norm with eps=8. Diffusers-style arguments
    now raise a TypeError instead."""

    def __init__(self, *args, **kwargs) -> None:
        warnings.warn("groupnorm.AdaGroupNorm is deprecated: use groupnorm.GroupNormScaleShift (same "
                      "arguments); to fuse diffusers' AdaGroupNorm use groupnorm.convert(model, fuse=True)",
                      DeprecationWarning, stacklevel=2)
        _refuse_diffusers_args(args, kwargs)
        super().__init__(*args, **kwargs)


def _refuse_diffusers_args(args, kwargs) -> None:
    # Ours: (num_groups, num_channels, eps: float, affine: bool, ...). An int third argument
    # or a string fourth is diffusers' (..., num_groups: int, act_fn: str); so is num_groups
    # by keyword after positional arguments (diffusers' third parameter).
    diffusers_style = (any(k in kwargs for k in _DIFFUSERS_ARGS)
                       or ("num_groups" in kwargs and len(args) > 0)
                       or (len(args) > 2 and isinstance(args[2], int) and not isinstance(args[2], bool))
                       or (len(args) > 3 and isinstance(args[3], str)))
    if diffusers_style:
        raise TypeError(
            "groupnorm.AdaGroupNorm(num_groups, num_channels, eps, ...) was called with diffusers' "
            "AdaGroupNorm arguments (embedding_dim, out_dim, num_groups, act_fn, eps). Build "
            "diffusers.models.normalization.AdaGroupNorm and fuse it with groupnorm.convert(model, "
            "fuse=True), or use groupnorm.GroupNormScaleShift(num_groups, num_channels, eps) for a "
            "norm that takes scale/shift per call.")


def _per_sample(t: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    # Accept (N, C) or the (N, C, 1, ..., 1) shape models broadcast with.
    if t is None or t.dim() == 2:
        return t
    if t.dim() == x.dim() and all(s == 1 for s in t.shape[2:]):
        return t.reshape(t.shape[0], t.shape[1])
    return t
