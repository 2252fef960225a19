"""Side-by-side timing: medians (with p20/p80) of many runs, CPU or CUDA."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch


@dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    runs: int

    @property
    def median_us(self) -> float:
        return self.median_s * 1e6


def _quantile(sorted_values: List[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[index]


def time_fn(fn: Callable[[], object], device: torch.device | str = "cpu", *,
            warmup: int = 3, min_runs: int = 10, max_runs: int = 200,
            budget_s: float = 1.0) -> Timing:
    """Time ``fn`` repeatedly; CUDA runs are timed with events around each call."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    start_all = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() - start_all < budget_s):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3)
    else:
        while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() - start_all < budget_s):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    samples.sort()
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8), len(samples))


def time_interleaved(fns: List[Callable[..., object]], *, rounds: int = 5, warmup: int = 3,
                     min_runs: int = 10, max_runs: int = 200, budget_s: float = 1.0,
                     setups: Optional[List[Callable[[], object]]] = None) -> List[Timing]:
    """CPU timings of several functions taken in alternating rounds (a, b, a, b, ...), so a
    load spike or clock change on a shared machine hits every side alike; each round runs
    a block of calls of one function (its pool warm, as in a real loop).

    With ``setups``, each call is ``fn(setup())`` and only ``fn`` is timed: how a backward
    alone is timed, its forward (a fresh graph per call) run untimed just before it.
    """
    if setups is None:
        calls = [(None, fn) for fn in fns]
    else:
        calls = list(zip(setups, fns))

    def run(setup, fn) -> float:
        if setup is None:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        arg = setup()
        t0 = time.perf_counter()
        fn(arg)
        return time.perf_counter() - t0

    for setup, fn in calls:
        for _ in range(warmup):
            run(setup, fn)
    samples: List[List[float]] = [[] for _ in fns]
    per_round = budget_s / rounds
    for _ in range(rounds):
        for (setup, fn), out in zip(calls, samples):
            run(setup, fn)   # first call of a block: the other side's threads may still be spinning
            start = time.perf_counter()
            taken = 0
            while taken < max_runs // rounds and (taken < max(1, min_runs // rounds)
                                                  or time.perf_counter() - start < per_round):
                out.append(run(setup, fn))
                taken += 1
    timings = []
    for out in samples:
        out.sort()
        timings.append(Timing(statistics.median(out), _quantile(out, 0.2), _quantile(out, 0.8), len(out)))
    return timings


def bytes_moved(*tensors: torch.Tensor) -> int:
    """Bytes a memory-bound kernel must move at least: every named tensor once."""
    return sum(t.numel() * t.element_size() for t in tensors)
