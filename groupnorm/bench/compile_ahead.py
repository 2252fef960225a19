"""Cold-cache Numba compiles of a run's later work, done ahead in a second process.

A kernel compiles on its first call with each family of argument types (dtype, layout,
rank, path) and is cached on disk; a cold main job needs about ten such families, 20-50 s
of one core each. Compiling is single-threaded, so on a 2-core machine a second process
compiling the families the job needs later, into the same on-disk cache, halves the wait:
the job then loads them (well under a second each). The cache is safe to share between
processes (see ``backends.numba_cpu.cache_stamp``).

A unit is one public-API call pattern on one input: a no-grad forward and a training step
(forward, then the gradients of x, weight and bias), what the main job itself runs.

    python -m groupnorm.bench.compile_ahead < units.json   # prints "done <index> <seconds>" per unit
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch

# (shape, num_groups, dtype name, weight and bias dtype name, layout "nchw" | "nhwc")
Unit = Tuple[Tuple[int, ...], int, str, str, str]


def run_unit(unit: Unit) -> None:
    """The calls of one unit, compiling (or loading) every kernel they reach."""
    from ..functional import group_norm

    shape, groups, dtype_name, param_dtype_name, layout = unit
    dtype, param_dtype = getattr(torch, dtype_name), getattr(torch, param_dtype_name)
    x = torch.randn(shape).to(dtype)
    if layout == "nhwc":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
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

    def wait_for(self, index: Optional[int] = None,
                 progress: Optional[Callable[[int, int], None]] = None) -> None:
        """Until unit ``index`` (every unit when None) is done or the child has ended;
        ``progress(done, total)`` is called every few seconds of waiting."""
        wanted = set(range(len(self.units))) if index is None else {index}
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
    units: List[Unit] = [(tuple(u[0]), int(u[1]), *map(str, u[2:])) for u in json.load(sys.stdin)]
    for i, unit in enumerate(units):
        start = time.perf_counter()
        run_unit(unit)
        print(f"done {i} {time.perf_counter() - start:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
