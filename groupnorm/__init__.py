"""groupnorm: torch.nn.GroupNorm and F.group_norm, exactly, on our own kernels.

Public API (imports point one way: this file -> modules/functional -> ops -> backends):
  GroupNorm, group_norm            drop-ins for torch's
"""
from . import ops  # noqa: F401  (registers the torch.library ops)
from .functional import group_norm
from .modules import GroupNorm
from .epilogue import ACTIVATIONS

__version__ = "0.1.0"

__all__ = ["GroupNorm", "group_norm", "ACTIVATIONS", "__version__"]
