"""Triton GPU backend (see the contract in ``groupnorm/backends/__init__.py``).

Modules, one job each: ``plan`` (path, grid, block sizes and split counts from shapes),
``direct`` (launching a compiled kernel without ``JITFunction.run``), ``epilogue_jit``
(affine, scale/shift and activations as Triton functions), ``stats_kernels`` (fused
one-read forward, two-stage split statistics), ``group_kernels`` (one program per group
looping over it: forward in one launch, backward in two), ``apply_kernels``,
``backward_kernels`` (split backward: tile partials, then their merge with dx),
``launch`` (allocation and launches) and ``known`` (the everyday eager call's entries:
``forward_known``, ``forward_known_stats``, ``backward_known``). Beyond the contract:
``backward_grads`` (every gradient in one or two launches; ops.backward_grads prefers
it), ``forward_output`` (y alone). Runs on CUDA tensors, or on CPU tensors under
TRITON_INTERPRET=1.
"""
from __future__ import annotations

import triton  # noqa: F401  (an ImportError here makes the registry skip this backend)

from .known import backward_known, forward_known, forward_known_stats
from .launch import apply, backward_dx, backward_grads, backward_reduce, forward, forward_output, stats

__all__ = ["forward", "stats", "apply", "backward_reduce", "backward_dx", "backward_grads", "forward_output",
           "forward_known", "forward_known_stats", "backward_known"]
