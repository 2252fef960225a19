"""First-call cost: kernels compile when a call first needs them, and say so while they do.

Numba compiles per argument types on a kernel's first call; with ``cache=True`` the machine
code lands on disk, so only the first process on a machine pays. A call compiles only the
entries it reaches: a first float32 forward + backward on a 2-core machine compiles two
entries (about 10 s and 15-20 s; measured 2026-12-07, see BENCHMARKS.md), every later process
loads them in well under a second. Nothing here runs at import.

* ``compile_notices(report)`` tells a caller, while it happens, which kernel is compiling and
  how long it took (the main job prints it: a long silent pause looks like a hang).
* ``warmup()`` compiles every common signature up front (all dtypes, both layouts, a few
  minutes on a cold cache): for images and CI caches that want no compile at first use.

Numba's cache stamps a kernel with its own source file only; ``cache_stamp`` adds a hash of
every module of this package, so an edit to a helper recompiles the kernels that inline it.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import torch

from . import launch

COMMON_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
PACKAGE = __name__.rsplit(".", 1)[0]

# report(kernel name, None) when an outermost compile starts, report(kernel name, seconds) when it ends.
Report = Callable[[str, "float | None"], None]


def _ours(dispatcher) -> bool:
    return getattr(getattr(dispatcher, "py_func", None), "__module__", "").startswith(PACKAGE)


@contextlib.contextmanager
def compile_notices(report: Report) -> Iterator[None]:
    """Within the block, ``report`` hears of every compile of one of this package's kernels
    that is not nested in another (callees compile inside their caller's compile). Numba
    raises its compile event on a cache miss only, so a load from disk stays quiet."""
    from numba.core import event

    class Listener(event.Listener):
        depth = 0
        started = 0.0

        def on_start(self, ev):
            self.depth += 1
            if self.depth == 1 and _ours(ev.data["dispatcher"]):
                self.started = time.perf_counter()
                report(ev.data["dispatcher"].py_func.__name__, None)

        def on_end(self, ev):
            self.depth -= 1
            if self.depth == 0 and _ours(ev.data["dispatcher"]):
                report(ev.data["dispatcher"].py_func.__name__, time.perf_counter() - self.started)

    listener = Listener()
    event.register("numba:compile", listener)
    try:
        yield
    finally:
        event.unregister("numba:compile", listener)


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
    """{'seconds': first-call cost of the common signatures} (``warmup``'s time)."""
    return {"seconds": warmup()}
