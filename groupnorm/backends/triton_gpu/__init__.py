"""Triton GPU backend (see the contract in ``groupnorm/backends/__init__.py``).

Modules, one job each: ``plan`` (block sizes and split counts from shapes), ``epilogue_jit``
(affine, scale/shift and activations as Triton functions), ``stats_kernels`` (fused one-read
forward, two-stage split statistics), ``apply_kernels``, ``backward_kernels`` and ``launch``
(allocation and launches). Beyond the contract, ``backward_grads`` gives every gradient in
three launches (ops.backward_grads prefers it). Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import triton  # noqa: F401  (an ImportError here makes the registry skip this backend)

from .launch import apply, backward_dx, backward_grads, backward_reduce, forward, stats

__all__ = ["forward", "stats", "apply", "backward_reduce", "backward_dx", "backward_grads"]
