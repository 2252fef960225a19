"""What the sums in a fixed, compiler-proof order cost (fourteenth session).

    python benchmarks/ab_fixed_order_sums.py

Why: the library's sum loops are compiled with ``reassoc`` (LLVM vectorises them into
partial sums of its choosing). A kernel compiled in a process that loads some callees
from another process's cache can then sum in another order than the same kernel
compiled in one process (last-bit differences between paths; the thirteenth session's
notes, ARCHITECTURE.md). Sums whose order is written out (``fixed_order_sums_kernels``:
LANES partial sums, a tree of strict adds as explicit vector shuffles) cannot change
with the compilation context. This script times the library's sum functions, which
now sum in lanes (``stats_kernels.shifted_chunk_moments``, ``backward_kernels.reduce_rows_none``),
against the reassociated loops they replaced (``fixed_order_sums_kernels``), interleaved in
one process (medians), and checks both against float64.
"""
from __future__ import annotations

import importlib.util
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

import groupnorm.backends.numba_cpu  # noqa: E402,F401  (installs the function attributes first)
from groupnorm.backends.numba_cpu.backward_kernels import reduce_rows_none  # noqa: E402
from groupnorm.backends.numba_cpu.lanes import LANES  # noqa: E402
from groupnorm.backends.numba_cpu.stats_kernels import shifted_chunk_moments  # noqa: E402
from groupnorm.bench.timing import time_interleaved  # noqa: E402

_NAME = "groupnorm.backends.numba_cpu.zz_fixed_order_sums"   # package functions get its attributes
_spec = importlib.util.spec_from_file_location(
    _NAME, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixed_order_sums_kernels.py"))
kernels = importlib.util.module_from_spec(_spec)
sys.modules[_NAME] = kernels
_spec.loader.exec_module(kernels)


def chunk_rows(rng) -> None:
    print("| shifted_chunk_moments | dtype | length | lanes ns/element | reassoc ns/element | lanes / reassoc | "
          "rel. error of m2, lanes, reassoc |\n|---|---|---:|---:|---:|---:|---|")
    for dtype in (np.float32, np.float64):
        for length in (4096, 1000, 64):
            row = (rng.standard_normal(length) + 3).astype(dtype)
            zero, shift = dtype(0), dtype(3)
            exact = np.sum((row.astype(np.float64) - row.astype(np.float64).mean()) ** 2)
            errors = [abs(float(f(row, 0, length, shift, zero)[1]) - exact) / exact
                      for f in (shifted_chunk_moments, kernels.shifted_reassoc)]
            reps = max(1, 200000 // length)
            fixed, reassoc = time_interleaved([lambda: kernels.repeat_shifted(True, row, reps, zero, shifted_chunk_moments),
                                               lambda: kernels.repeat_shifted(False, row, reps, zero, shifted_chunk_moments)],
                                              budget_s=0.4, rounds=7)
            per = 1e3 / (reps * length)
            print(f"| | {dtype.__name__} | {length} | {fixed.median_us * per:.3f} | {reassoc.median_us * per:.3f} | "
                  f"{fixed.median_us / reassoc.median_us:.2f} | {errors[0]:.1e}, {errors[1]:.1e} |")


def backward_rows(rng) -> None:
    print("\n| reduce_rows_none (float32) | rows x length | lanes us | reassoc us | lanes / reassoc |\n"
          "|---|---|---:|---:|---:|")
    for rows, length in ((2560, 64), (2560, 100), (640, 1024), (64, 16384)):
        x = rng.standard_normal((rows, length)).astype(np.float32)
        dy = rng.standard_normal((rows, length)).astype(np.float32)
        mean = rng.standard_normal(rows).astype(np.float32)
        rstd = np.ones(rows, np.float32)
        outs = [np.empty(rows, np.float32) for _ in range(4)]
        zero = np.float32(0)
        fixed = lambda: reduce_rows_none(dy, x, 0, rows, mean, rstd, outs[0], outs[1], zero)  # noqa: E731
        reassoc = lambda: kernels.rows_reassoc(dy, x, 0, rows, mean, rstd, outs[2], outs[3], zero)  # noqa: E731
        fixed()
        reassoc()
        exact = np.sum(dy.astype(np.float64) * (x.astype(np.float64) - mean[:, None]), axis=1)
        assert np.allclose(outs[0], exact, rtol=1e-4, atol=1e-3) and np.allclose(outs[2], exact, rtol=1e-4, atol=1e-3)
        t_fixed, t_reassoc = time_interleaved([fixed, reassoc], budget_s=0.6, rounds=7)
        print(f"| | {rows} x {length} | {t_fixed.median_us:.1f} | {t_reassoc.median_us:.1f} | "
              f"{t_fixed.median_us / t_reassoc.median_us:.2f} |")


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"LANES = {LANES}; medians, one thread")
    chunk_rows(rng)
    backward_rows(rng)


if __name__ == "__main__":
    main()
