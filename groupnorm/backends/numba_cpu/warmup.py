"""First-call cost: compile (or load from the on-disk cache) the common signatures.

Numba compiles per argument types; with ``cache=True`` the machine code lands next to the
sources, so only the very first process pays the full compile time (about 100 s of CPU
for all dtypes and layouts on a 2-core machine; about 1 s to load from the cache).
Numba's cache stamps a kernel with its own source file only; ``cache_stamp`` adds a hash
of every module of this package, so an edit to a helper (bits, elements, coefs, ...)
recompiles the kernels that inline it instead of loading stale code.
"""
from __future__ import annotations

import time

import torch

from . import launch

COMMON_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def warmup(dtypes=COMMON_DTYPES, activations=("none",)) -> float:
    """Run every contract function once per dtype and memory format; return the seconds."""
    start = time.perf_counter()
    for dtype in dtypes:
        for channels_last in (False, True):
            x = torch.randn(1, 4, 2, 2).to(dtype)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            w = torch.ones(4, dtype=dtype)
            for act in activations:
                y, mean, rstd = launch.forward(x, w, w, None, None, 2, 1e-5, act)
                launch.stats(x, 2)
                launch.apply(x, mean, rstd, w, w, None, None, 2, act)
                s1, s0 = launch.backward_reduce(y, x, mean, rstd, w, w, None, None, 2, act)
                g = s1.view(1, 2, 2).sum(-1)
                launch.backward_dx(y, x, mean, rstd, w, w, None, None, g, g, 8, 2, act)
                launch.backward_grads(y, x, mean, rstd, w, w, None, None, 2, act)   # two-stage entries
            if channels_last:   # samples over 2^18 elements take the pixel-block forward
                xb = torch.randn(1, 8, 256, 130).to(dtype).to(memory_format=torch.channels_last)
                wb = torch.ones(8, dtype=dtype)
                for act in activations:
                    launch.forward(xb, wb, wb, None, None, 4, 1e-5, act)
            if not channels_last:          # the fused backward needs N * G >= 8
                x8 = torch.randn(2, 8, 2, 2).to(dtype)
                w8 = torch.ones(8, dtype=dtype)
                for act in activations:
                    y, mean, rstd = launch.forward(x8, w8, w8, None, None, 4, 1e-5, act)
                    launch.backward_grads(y, x8, mean, rstd, w8, w8, None, None, 4, act)
    return time.perf_counter() - start


def compile_time_report() -> dict:
    """{'seconds': first-call cost of the common signatures} for the main job to print."""
    return {"seconds": warmup()}
