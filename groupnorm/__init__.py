"""groupnorm: torch.nn.GroupNorm and F.group_norm, exactly, on our own kernels.

Public API (imports point one way: this file -> modules/functional -> ops -> backends):
  GroupNorm, group_norm                 drop-ins for torch's (keyword-only fused extras)
  GroupNormAct, AdaGroupNorm            fused activation / per-call scale-shift modules
  convert, revert                       swap torch.nn.GroupNorm in a model, and back
  GroupStats, group_stats, merge_stats  exact statistics across tiles and devices
"""
import importlib

from . import ops  # noqa: F401  (registers the torch.library ops)
from .epilogue import ACTIVATIONS
from .functional import group_norm
from .modules import GroupNorm
# Eager, because the submodule shares the function's name: importing groupnorm.convert makes
# the package attribute `convert` the module, unless the function is bound after it (here).
from .convert import convert, revert  # noqa: E402

__version__ = "0.1.0"

# Names served from submodules on first use, so `import groupnorm` stays light.
_LAZY = {
    "GroupNormAct": "groupnorm.fused_modules",
    "AdaGroupNorm": "groupnorm.fused_modules",
    "GroupStats": "groupnorm.stats",
    "group_stats": "groupnorm.stats",
    "merge_stats": "groupnorm.stats",
}

__all__ = ["GroupNorm", "group_norm", "ACTIVATIONS", "convert", "revert", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'groupnorm' has no attribute {name!r}")
