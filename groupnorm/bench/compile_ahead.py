"""Cold-cache compiles of a run's later work, done ahead in a second process.

A Numba kernel compiles on its first call with each family of argument types (dtype,
layout, rank, path), 10-50 s of one core each, and is cached on disk; torch.compile's peer
of each benchmark row compiles for a few seconds and is cached on disk too (Inductor's FX
graph and AOTAutograd caches). Compiling is single-threaded, so on a 2-core machine a
second process compiling what the job needs later, into the same on-disk caches, halves
the wait: the job then loads it (well under a second a kernel, ~0.1 s a row's peer).
Numba's cache is safe to share between processes (see ``backends.numba_cpu.cache_stamp``).

Units (JSON lists):

* ``["calls", shape, groups, dtype, param_dtype, layout]``: a no-grad forward and a training
  step (forward, then the gradients of x, weight and bias) through the public API, as the
  main job runs them;
* ``["peers", shape, groups, dtype, layout]``: the torch.compile peers of a CPU speed row
  (``bench.cpu.prepare_compile_peers``).

    python -m groupnorm.bench.compile_ahead < units.json   # prints "done <index> <seconds>" per unit
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Callable, Iterable, List, Optional, Sequence

import torch

# ("calls", shape, num_groups, dtype name, weight and bias dtype name, layout "nchw" | "nhwc")
# ("peers", shape, num_groups, dtype name, layout)
Unit = tuple


def _input(shape, dtype, layout):
    x = torch.randn(shape).to(dtype)
    return x.movedim(1, -1).contiguous().movedim(-1, 1) if layout == "nhwc" else x


def run_unit(unit: Unit) -> None:
    """The calls of one unit, compiling (or loading) every kernel or graph they reach."""
    kind, shape, groups = unit[0], tuple(unit[1]), int(unit[2])
    if kind == "peers":
        from .cpu import prepare_compile_peers
        from .suite import Case

        prepare_compile_peers(Case("ahead", shape, groups), getattr(torch, unit[3]), unit[4])
        return
    if kind != "calls":
        raise ValueError(f"unknown unit kind {kind!r}")
    from ..functional import group_norm

    dtype, param_dtype, layout = getattr(torch, unit[3]), getattr(torch, unit[4]), unit[5]
    x = _input(shape, dtype, layout)
    w = torch.ones(shape[1], dtype=param_dtype)
    b = torch.zeros(shape[1], dtype=param_dtype)
    with torch.no_grad():
        group_norm(x, groups, w, b)
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    y = group_norm(leaves[0], groups, leaves[1], leaves[2])
    torch.autograd.grad(y, leaves, torch.ones_like(y))


class CompileAhead:
    """A child process running ``units`` in order; ``wait_for(i)`` blocks until unit i is
    done there (or the child has ended: the caller then compiles whatever is left itself)."""

    def __init__(self, units: Sequence[Unit]) -> None:
        self.units = list(units)
        self.done: set = set()
        self._changed = threading.Condition()
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
        self._proc = subprocess.Popen([sys.executable, "-m", "groupnorm.bench.compile_ahead"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True, env=env)
        self._proc.stdin.write(json.dumps(self.units))
        self._proc.stdin.close()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "done":
                with self._changed:
                    self.done.add(int(parts[1]))
                    self._changed.notify_all()
        self._proc.wait()
        with self._changed:
            self._changed.notify_all()

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    def indices(self, kind: str) -> List[int]:
        """The indices of the units of one kind ("calls", "peers"), in order."""
        return [i for i, unit in enumerate(self.units) if unit[0] == kind]

    def wait_for(self, index: "int | Iterable[int] | None" = None,
                 progress: Optional[Callable[[int, int], None]] = None) -> None:
        """Until unit ``index`` (several, or every unit when None) is done or the child has
        ended; ``progress(done, total)`` is called every few seconds of waiting."""
        if index is None:
            wanted = set(range(len(self.units)))
        else:
            wanted = {index} if isinstance(index, int) else set(index)
        last = time.perf_counter()
        with self._changed:
            while not wanted <= self.done and (self.running or self._reader.is_alive()):
                self._changed.wait(timeout=1.0)
                if progress is not None and time.perf_counter() - last >= 5.0:
                    progress(len(self.done), len(self.units))
                    last = time.perf_counter()

    def close(self) -> None:
        if self.running:
            self._proc.kill()
        self._proc.wait()


def main() -> int:
    units: List[Unit] = json.load(sys.stdin)
    for i, unit in enumerate(units):
        start = time.perf_counter()
        run_unit(unit)
        print(f"done {i} {time.perf_counter() - start:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
