"""Numba CPU backend: the five contract functions (see ``groupnorm.backends``), plus
``forward_output`` (y alone, for inference), ``backward_fused`` (both backward stages in
one call, for a backward with no all-reduce between them; see launch.backward_fused) and
``backward_grads`` (the same, returning the input gradients themselves).

Modules, one job each: ``bits`` (half <-> float32 bit conversion), ``elements`` (typed
load/store), ``lanes`` (sums in a fixed order), ``activations``, ``stats_kernels``, ``coefs``, ``apply_kernels``,
``forward_kernels``, ``backward_kernels``, ``entries`` (compiled glue: one call per backward),
``threads``, ``numpy_views``, ``alloc`` (with ``output_pool``: reuse of freed outputs) and
``launch`` (the torch glue). ``warmup()`` compiles the common signatures and returns the seconds it took.
``cache_stamp`` makes Numba's on-disk cache follow edits to any of these modules and
``function_attributes`` sets LLVM attributes on them (512-bit vectors, sums kept out of
line); both are imported first, before any kernel is decorated or compiled.
"""
from . import cache_stamp, function_attributes  # noqa: F401  (first: see both)
from .launch import (apply, backward_dx, backward_fused, backward_grads, backward_known, backward_reduce, forward,
                     forward_known, forward_known_stats, forward_output, stats)
from .warmup import compile_time_report, warmup

__all__ = ["forward", "forward_output", "forward_known", "forward_known_stats", "backward_known", "stats", "apply", "backward_reduce", "backward_dx", "backward_fused", "backward_grads", "warmup",
           "compile_time_report"]
