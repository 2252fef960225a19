"""``GroupNorm``: a torch.nn.GroupNorm subclass whose forward runs groupnorm's kernels.

Subclassing keeps everything users and tools test for: ``isinstance(m, nn.GroupNorm)``,
parameters, ``reset_parameters``, ``repr``, ``state_dict`` keys and checkpoints.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from . import validation
from .epilogue import activation_name
from .functional import group_norm

Tensor = torch.Tensor

# torch.nn.GroupNorm gained a keyword-only ``bias`` argument in recent releases.
_TORCH_HAS_BIAS_ARG = "bias" in inspect.signature(torch.nn.GroupNorm.__init__).parameters


class GroupNorm(torch.nn.GroupNorm):
    """Drop-in ``torch.nn.GroupNorm``; keyword-only extras fuse an activation and shard the
    statistics across a process group (see ``groupnorm.group_norm``)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, bias: bool = True, activation: Optional[str] = None,
                 process_group=None) -> None:
        validation.check_module_args(num_groups, num_channels)
        if process_group is not None:
            from .shard_exchange import check_process_group

            check_process_group(process_group)
        if _TORCH_HAS_BIAS_ARG:
            super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias)
        else:
            super().__init__(num_groups, num_channels, eps, affine, device, dtype)
            if affine and not bias:
                self.register_parameter("bias", None)
        self.activation = activation_name(activation)
        self.process_group = process_group

    def forward(self, input: Tensor) -> Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps,
                          activation=self.activation, process_group=self.process_group)

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """``torch.jit.script`` compiles this instead: the same parameters and extras on
        torch's own ops (TorchScript cannot call our kernels' Python launchers)."""
        if self.process_group is not None:
            raise RuntimeError("torch.jit.script: a GroupNorm sharded over a process_group cannot be scripted "
                               "(its statistics need torch.distributed calls from Python); script the model "
                               "without process_group, or use torch.compile")
        from .portable import ScriptableGroupNorm

        return ScriptableGroupNorm(self)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.activation != "none":
            text += f", activation={self.activation!r}"
        return text

    @classmethod
    def from_torch(cls, module: torch.nn.GroupNorm, **extras) -> "GroupNorm":
        """Our module sharing ``module``'s parameters (same tensors), mode and hooks' targets."""
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.__dict__.update({k: v for k, v in module.__dict__.items()})
        new.activation = activation_name(extras.get("activation"))
        new.process_group = extras.get("process_group")
        return new
