"""The layer in torch's own ops, for the tools that cannot run our kernels.

ONNX export (both exporters) and ``torch.jit.script`` need a graph of standard operators:
``torch_group_norm`` is ``F.group_norm`` followed by the fused extras exactly as our
kernels order them (modulation, then activation), so the exported or scripted model
computes what ours does, with torch's kernels. ``torch.jit.trace`` keeps our kernels: it
records the ``groupnorm::forward`` custom op instead (see ``eager.usable``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _per_sample(t: Tensor, x: Tensor) -> Tensor:
    """(N, C) -> (N, C, 1, ...) to broadcast over x; other shapes are taken as they are."""
    if t.dim() == 2:
        for _ in range(x.dim() - 2):
            t = t.unsqueeze(-1)
    return t


def torch_group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                     eps: float, activation: str, scale: Optional[Tensor], shift: Optional[Tensor]) -> Tensor:
    """act((group_norm(x) * w + b) * (1 + scale) + shift) in torch ops (TorchScript-compatible)."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        y = y * (1.0 + _per_sample(scale, x))
    if shift is not None:
        y = y + _per_sample(shift, x)
    if activation == "silu":
        y = F.silu(y)
    elif activation == "gelu":
        y = F.gelu(y)
    elif activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    elif activation == "relu":
        y = F.relu(y)
    elif activation == "mish":
        y = F.mish(y)
    return y


def exporting() -> bool:
    """An ONNX export is tracing the call (TorchScript-based or ``dynamo=True``)."""
    return torch.onnx.is_in_onnx_export()


class ScriptableGroupNorm(torch.nn.Module):
    """What ``torch.jit.script`` compiles in place of our modules (``__prepare_scriptable__``):
    the same parameters (shared, same ``state_dict`` keys) and extras, run by torch's ops."""

    def __init__(self, source: torch.nn.GroupNorm) -> None:
        super().__init__()
        self.num_groups = int(source.num_groups)
        self.num_channels = int(source.num_channels)
        self.eps = float(source.eps)
        self.affine = bool(source.affine)
        self.activation = str(getattr(source, "activation", "none"))
        self.register_parameter("weight", source.weight)
        self.register_parameter("bias", source.bias)

    def forward(self, input: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
        return torch_group_norm(input, self.num_groups, self.weight, self.bias, self.eps, self.activation,
                                scale, shift)
