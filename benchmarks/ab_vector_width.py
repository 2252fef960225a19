"""512- against 256-bit vectors per Numba kernel, in one process (function_attributes).

    python benchmarks/ab_vector_width.py                 # every kernel chain below
    python benchmarks/ab_vector_width.py apply_cl dx_cl  # some of them

Two processes of a 2-core VM differ by more than the effect (5-10% between runs of the
same code), so each kernel chain is compiled twice here, as clones of the package's own
functions: once under a module name inside the package (function_attributes gives it
"prefer-vector-width"="512") and once outside it (LLVM's default, 256 bits on AVX-512
cores), the leaf that holds the hot loop included. The clones are timed interleaved
(medians), float32 and bfloat16 (as uint16 bits), two threads. On a CPU without AVX-512
both columns are the same code.
"""
from __future__ import annotations

import os
import sys
import types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from numba import njit  # noqa: E402

from groupnorm.backends.numba_cpu import apply_kernels as ak  # noqa: E402
from groupnorm.backends.numba_cpu import backward_kernels as bk  # noqa: E402
from groupnorm.backends.numba_cpu import forward_kernels as fk  # noqa: E402
from groupnorm.backends.numba_cpu import stats_kernels as sk  # noqa: E402
from groupnorm.bench.timing import time_interleaved  # noqa: E402

WIDE_MODULE = "groupnorm.backends.numba_cpu.width_probe"   # inside the package: 512 bits
DEFAULT_MODULE = "width_probe"                              # outside it: LLVM's default
SHAPES = [(2, 320, 4096), (2, 640, 1024), (2, 1280, 64), (1, 128, 9 * 4096)]   # (N, C, HW)
GROUPS = 32
_OPTIONS = ("parallel", "fastmath", "error_model", "boundscheck")


def clone_chain(chain, module):
    """Fresh, uncached dispatchers of chain = [top, ..., leaf] defined in ``module``; each
    clone calls the next one (looked up by its global name), so the leaf is cloned too."""
    made = None
    for disp in reversed(chain):
        py = disp.py_func
        scope = dict(py.__globals__)
        if made is not None:
            scope[made[0]] = made[1]
        fn = types.FunctionType(py.__code__, scope, py.__name__, py.__defaults__, py.__closure__)
        fn.__module__, fn.__qualname__ = module, py.__qualname__
        options = {k: v for k, v in disp.targetoptions.items() if k in _OPTIONS}
        made = (py.__name__, njit(cache=False, **options)(fn))
    return made[1]


def _bits(a: np.ndarray, dtype) -> np.ndarray:
    """float32 values as dtype: float32 itself, or bfloat16 bits (uint16)."""
    return a if dtype == np.float32 else (a.view(np.uint32) >> 16).astype(np.uint16)


def _coefs(n, c, k):
    return [np.random.randn(n, c).astype(np.float32) for _ in range(k)]


def _cases(N, C, HW):
    """name -> (chain, args(dtype), dtypes)."""
    f32 = np.float32
    rows, cpg, empty = N * C, C // GROUPS, np.empty(0, np.float32)

    def pixels(dt):
        return _bits(np.random.randn(N, HW, C).astype(f32), dt)

    def planes(dt):
        return _bits(np.random.randn(N * GROUPS, cpg * HW).astype(f32), dt)

    def rows_(dt):
        return _bits(np.random.randn(rows, HW).astype(f32), dt)

    stats = (np.empty((N, GROUPS), f32), np.empty((N, GROUPS), f32))
    w, b = np.random.randn(C).astype(f32), np.random.randn(C).astype(f32)
    return {
        "forward_groups": ([fk.forward_groups, fk.groups_run, fk.groups_stats, fk.groups_apply],
                           lambda dt: (planes(dt), np.empty_like(planes(dt)), HW, w, b, empty, empty, 1e-5, 0, f32(0),
                                       *stats, None, 2)),
        "apply_cl": ([ak.apply_channels_last, ak.apply_pixel_task, ak.apply_pixels],
                     lambda dt: (pixels(dt), np.empty_like(pixels(dt)), *_coefs(N, C, 3), 0, None)),
        "stats_cl": ([sk.stats_channels_last, sk.pixel_task_run, sk.pixel_task_moments, sk.shifted_channel_sums],
                     lambda dt: (pixels(dt), GROUPS, *stats, f32(0), 2)),
        "dx_cl": ([bk.dx_channels_last, bk.dx_run_backwards, bk.dx_pixel_task, bk.dx_pixels],
                  lambda dt: (pixels(dt), pixels(dt), np.empty_like(pixels(dt)), *_coefs(N, C, 5), 0, None, 2)),
        "reduce_cl": ([bk.reduce_channels_last, bk.reduce_pixel_run, bk.reduce_pixels],
                      lambda dt: (pixels(dt), pixels(dt), *_coefs(N, C, 4), 0, np.empty((N, C), f32),
                                  np.empty((N, C), f32), f32(0), 2)),
        "dx_rows": ([bk.backward_fused_rows, bk.fused_groups_run, bk.group_dx_terms, bk.dx_row_block,
                     bk.dx_rows_none],
                    lambda dt: (rows_(dt), rows_(dt), np.empty_like(rows_(dt)), cpg,
                                *[np.random.randn(rows).astype(f32) for _ in range(4)], np.random.randn(rows), 0,
                                np.empty(rows, f32), np.empty(rows, f32), True, f32(0), None, 2)),
    }


def main(names) -> None:
    torch.set_num_threads(2)
    numba.set_num_threads(2)
    print(f"numba {numba.__version__}, threads 2; medians in us, 512-bit clone vs 256-bit clone")
    print("| kernel | shape (N, C, HW) | dtype | 512-bit us | 256-bit us | 256 / 512 |")
    print("|---|---|---|---:|---:|---:|")
    for shape in SHAPES:
        for name, (chain, make_args) in _cases(*shape).items():
            if names and name not in names:
                continue
            for dtype in (np.float32, np.uint16):
                args = make_args(dtype)
                wide, default = clone_chain(chain, WIDE_MODULE), clone_chain(chain, DEFAULT_MODULE)
                calls = [lambda f=f: f(*args) for f in (wide, default)]
                for call in calls:
                    call()   # compile outside the timing
                t_wide, t_default = time_interleaved(calls, rounds=10, budget_s=2.0, max_runs=3000)
                label = "float32" if dtype == np.float32 else "bfloat16 bits"
                print(f"| {name} | {shape} | {label} | {t_wide.median_us:.1f} | {t_default.median_us:.1f} | "
                      f"{t_default.median_s / t_wide.median_s:.3f} |", flush=True)


if __name__ == "__main__":
    main(set(sys.argv[1:]))
