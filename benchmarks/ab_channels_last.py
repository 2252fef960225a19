"""A/B of this session's two channels-last changes, each side by side in one process.

    python benchmarks/ab_channels_last.py

1. Pass order: the two-pass kernels (statistics then apply; reduce then dx) with the
   second pass walking each thread's run of pixel blocks backwards (as shipped:
   ``apply_kernels.apply_after_stats``, ``backward_kernels.dx_channels_last``) against
   the same runs walked forwards (a copy of the run loop compiled here, not cached).
   float32 numpy arrays, no activation, the launcher's streaming choice.
2. Small-sample backward: ``torch.autograd.grad`` through ``groupnorm.group_norm``
   with the per-sample backward (``entries.backward_samples``, chosen by the launcher)
   against the pixel-block backward (the launcher's rule patched to refuse), and ATen.

Medians of ``time_interleaved`` (alternating rounds), two threads.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from numba import njit, prange  # noqa: E402

import groupnorm  # noqa: E402
from groupnorm.backends.numba_cpu import apply_kernels as ak  # noqa: E402
from groupnorm.backends.numba_cpu import backward_kernels as bk  # noqa: E402
from groupnorm.backends.numba_cpu import launch, pixel_tasks  # noqa: E402
from groupnorm.backends.numba_cpu import stats_kernels as sk  # noqa: E402
from groupnorm.backends.numba_cpu.activations import NONE  # noqa: E402
from groupnorm.bench.timing import time_interleaved  # noqa: E402

GROUPS = 32
MID_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (1, 512, 64, 64), (2, 256, 100, 152)]
SMALL_SHAPES = [((2, 1280, 8, 8), torch.float32), ((2, 1280, 8, 8), torch.bfloat16),
                ((4, 512, 16, 16), torch.float32)]
FLAGS = dict(cache=False, error_model="numpy", fastmath={"contract", "nsz"})


@njit(**FLAGS)
def _apply_run_forwards(x, y, mean_c, a, b, bufs, t, stream, block_rows, blocks, first, end):
    for task in range(first, end):
        n, lo, hi = pixel_tasks.task_pixels(task, blocks, block_rows, x.shape[1])
        ak.apply_pixel_task(x, y, n, lo, hi, mean_c, a, b, NONE, bufs, t, stream)


@njit(parallel=True, **FLAGS)
def _apply_forwards(x, y, mean_c, a, b, stream, block_rows, threads):
    blocks = (x.shape[1] + block_rows - 1) // block_rows
    for t in prange(threads):
        first, end = pixel_tasks.thread_run(x.shape[0] * blocks, threads, t)
        _apply_run_forwards(x, y, mean_c, a, b, a, t, stream, block_rows, blocks, first, end)


@njit(**FLAGS)
def _dx_run_forwards(dy, x, dx, first, end, blocks, block_rows, mean_c, a, b, p, q, bufs, t, stream):
    for task in range(first, end):
        n, lo, hi = pixel_tasks.task_pixels(task, blocks, block_rows, x.shape[1])
        bk.dx_pixel_task(dy, x, dx, n, lo, hi, mean_c, a, b, p, q, NONE, bufs, t, stream)


@njit(parallel=True, **FLAGS)
def _dx_forwards(dy, x, dx, mean_c, a, b, p, q, stream, threads):
    block_rows = bk.pixel_rows(x.shape[2])
    blocks = (x.shape[1] + block_rows - 1) // block_rows
    for t in prange(threads):
        first, end = pixel_tasks.thread_run(x.shape[0] * blocks, threads, t)
        _dx_run_forwards(dy, x, dx, first, end, blocks, block_rows, mean_c, a, b, p, q, a, t, stream)


def pass_order(threads: int) -> None:
    print("| kernels | shape | backwards us | forwards us | forwards / backwards |")
    print("|---|---|---:|---:|---:|")
    rng = np.random.default_rng(0)
    zero = np.float32(0)
    for shape in MID_SHAPES:
        n, c = shape[:2]
        hw = int(np.prod(shape[2:]))
        x = rng.standard_normal((n, hw, c)).astype(np.float32)
        dy = rng.standard_normal((n, hw, c)).astype(np.float32)
        out = np.empty_like(x)
        mean, m2 = np.empty((n, GROUPS), np.float32), np.empty((n, GROUPS), np.float32)
        mc, rc, a, b, p, q = (rng.random((n, c)).astype(np.float32) for _ in range(6))
        s1, s0 = np.empty((n, c), np.float32), np.empty((n, c), np.float32)
        rows = sk.pixel_task_rows(hw, c)
        y_stream = launch.streams_known(x.size, 4, True)
        dx_stream = launch.streams_known(x.size, 4, True, True)

        def fwd_back():
            sk.stats_channels_last(x, GROUPS, mean, m2, zero, threads)
            ak.apply_after_stats(x, out, mc, a, b, NONE, y_stream, rows, threads)

        def fwd_fore():
            sk.stats_channels_last(x, GROUPS, mean, m2, zero, threads)
            _apply_forwards(x, out, mc, a, b, y_stream, rows, threads)

        def bwd_back():
            bk.reduce_channels_last(dy, x, mc, rc, a, b, NONE, s1, s0, zero, threads)
            bk.dx_channels_last(dy, x, out, mc, a, b, p, q, NONE, dx_stream, threads)

        def bwd_fore():
            bk.reduce_channels_last(dy, x, mc, rc, a, b, NONE, s1, s0, zero, threads)
            _dx_forwards(dy, x, out, mc, a, b, p, q, dx_stream, threads)

        label = "x".join(map(str, shape))
        for name, pair in (("statistics + apply", (fwd_back, fwd_fore)), ("reduce + dx", (bwd_back, bwd_fore))):
            for f in pair:
                f()
            back, fore = time_interleaved(list(pair), budget_s=3.0, rounds=10)
            print(f"| {name} | {label} | {back.median_us:.1f} | {fore.median_us:.1f} | "
                  f"{fore.median_s / back.median_s:.3f} |", flush=True)


def small_backward() -> None:
    print("| shape | dtype | per-sample us | pixel blocks us | ATen us | blocks / per-sample |")
    print("|---|---|---:|---:|---:|---:|")
    rule = launch.channels_last_per_sample
    try:
        for shape, dtype in SMALL_SHAPES:
            x = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
            w = torch.randn(shape[1], dtype=dtype, requires_grad=True)
            b = torch.randn(shape[1], dtype=dtype, requires_grad=True)
            dy = torch.randn_like(x)

            def forward(choose, fn=groupnorm.group_norm):
                def setup():
                    launch.channels_last_per_sample = choose
                    return fn(x, GROUPS, w, b)
                return setup

            def grad(y):
                return torch.autograd.grad(y, (x, w, b), dy)

            setups = [forward(rule), forward(lambda *args: False), forward(rule, F.group_norm)]
            samples, blocks, aten = time_interleaved([grad] * 3, setups=setups, budget_s=3.0, rounds=10,
                                                     max_runs=4000)
            print(f"| {'x'.join(map(str, shape))} | {str(dtype)[6:]} | {samples.median_us:.1f} | "
                  f"{blocks.median_us:.1f} | {aten.median_us:.1f} | {blocks.median_s / samples.median_s:.3f} |",
                  flush=True)
    finally:
        launch.channels_last_per_sample = rule


def main() -> None:
    torch.set_num_threads(2)
    numba.set_num_threads(2)
    print(f"torch {torch.__version__}, numba {numba.__version__}, threads 2, "
          f"load average {os.getloadavg()[0]:.2f}")
    pass_order(2)
    print()
    small_backward()
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
