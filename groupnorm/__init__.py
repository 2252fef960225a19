"""groupnorm: torch.nn.GroupNorm and F.group_norm, exactly, on our own kernels.

Public API (imports point one way: this file -> modules/functional -> ops -> backends):
  GroupNorm, group_norm                 drop-ins for torch's (keyword-only fused extras)
  GroupNormAct, GroupNormScaleShift     fused activation / per-call scale-shift modules
  (AdaGroupNorm: deprecated alias of GroupNormScaleShift)
  convert, revert                       swap torch.nn.GroupNorm in a model, and back
  GroupStats, group_stats, merge_stats  exact statistics across tiles and devices
  release_cached_memory                 hand the CPU backend's free output buffers back
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
    "GroupNormScaleShift": "groupnorm.fused_modules",
    "AdaGroupNorm": "groupnorm.fused_modules",   # deprecated alias of GroupNormScaleShift
    "GroupStats": "groupnorm.stats",
    "group_stats": "groupnorm.stats",
    "merge_stats": "groupnorm.stats",
}

__all__ = ["GroupNorm", "group_norm", "ACTIVATIONS", "convert", "revert", "release_cached_memory",
           "__version__", *_LAZY]


def release_cached_memory() -> int:
    """Give the memory of freed outputs that the CPU backend keeps for reuse back to the
    system (like ``torch.cuda.empty_cache``) -> bytes released. Outputs still in use are
    not touched. The pool's size is set by ``GROUPNORM_OUTPUT_POOL_MB`` (0: no pool)."""
    try:
        from .backends.numba_cpu import alloc
    except ImportError:   # no numba: nothing is pooled
        return 0
    return alloc.release_cached_memory()


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'groupnorm' has no attribute {name!r}")
