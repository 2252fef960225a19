"""Sums in a fixed order (backends/numba_cpu/lanes.py): the kernels' sums equal, bit for
bit, a numpy emulation of the documented order (term i into lane i % LANES, lanes added
by halves), and no kernel of the package is compiled with reassociation, so no
compilation context (fresh, or linked against a cached callee) can change that order."""
import importlib
import os
import pkgutil
import subprocess
import sys

import numba
import numpy as np
import pytest
import torch

import groupnorm.backends.numba_cpu as numba_cpu
from groupnorm.backends.numba_cpu import backward_kernels, lanes, stats_kernels
from groupnorm.backends.numba_cpu.activations import CODES

LENGTHS = [1, 5, 63, 64, 65, 100, 1000, 4096]


def lanes_sum(values: np.ndarray) -> np.ndarray:
    """The documented order, in numpy: values[i] added into lane i % LANES in index order
    (in values' dtype), then lanes[:h] + lanes[h:] until one is left."""
    acc = np.zeros(lanes.LANES, values.dtype)
    for start in range(0, values.size, lanes.LANES):
        block = values[start:start + lanes.LANES]
        acc[:block.size] += block
    while acc.size > 1:
        acc = acc[:acc.size // 2] + acc[acc.size // 2:]
    return acc[0]


def _rows(rows, length, dtype, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, length)) * 3 + 1).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("length", LENGTHS)
def test_backward_row_sums_follow_the_lane_order(length, dtype):
    """reduce_rows_none's sum(dy) per row (dy * (x - mean) also goes through an FMA, which
    numpy cannot emulate), three rows so a row's masked tail cannot reach the next."""
    dy, x = _rows(3, length, dtype, 1), _rows(3, length, dtype, 2)
    mean, rstd = x.mean(axis=1).astype(dtype), np.ones(3, dtype)
    sum_dz_xhat, sum_dz = np.full(3, np.nan, dtype), np.full(3, np.nan, dtype)
    backward_kernels.reduce_rows_none(dy, x, 0, 3, mean, rstd, sum_dz_xhat, sum_dz, dtype(0))
    want = np.array([lanes_sum(dy[r]) for r in range(3)])
    assert np.array_equal(sum_dz, want)
    assert np.allclose(sum_dz_xhat, ((dy.astype(np.float64) * (x - mean[:, None])).sum(axis=1)), rtol=1e-4,
                       atol=1e-3 * np.sqrt(length))


def test_long_rows_add_their_blocks_in_float64():
    """Rows over SUM_BLOCK elements: each block summed in lanes, the blocks added in float64."""
    length = 2 * backward_kernels.SUM_BLOCK + 333
    dy, x = _rows(2, length, np.float32, 3), _rows(2, length, np.float32, 4)
    mean, rstd = np.zeros(2, np.float32), np.ones(2, np.float32)
    sum_dz_xhat, sum_dz = np.full(2, np.nan, np.float32), np.full(2, np.nan, np.float32)
    backward_kernels.reduce_rows_none(dy, x, 0, 2, mean, rstd, sum_dz_xhat, sum_dz, np.float32(0))
    block = backward_kernels.SUM_BLOCK
    for r in range(2):
        total = 0.0
        for lo in range(0, length, block):
            total += np.float64(lanes_sum(dy[r, lo:lo + block]))
        assert sum_dz[r] == np.float32(total)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("length", LENGTHS)
def test_statistics_sums_follow_the_lane_order(length, dtype):
    """shifted_chunk_moments' mean = shift + sum(x - shift) / n, the sum in lanes."""
    row = _rows(1, length + 7, dtype, 5)[0]
    shift = dtype(0.75)
    mean, m2 = stats_kernels.shifted_chunk_moments(row, 7, length + 7, shift, dtype(0))
    part = row[7:] - shift
    assert mean == np.float64(shift) + np.float64(lanes_sum(part)) / length
    assert m2 == pytest.approx(((row[7:].astype(np.float64) - row[7:].mean(dtype=np.float64)) ** 2).sum(), rel=1e-4,
                               abs=1e-6)


def test_reduce_row_with_an_activation_sums_in_lanes():
    """The activation path stages act'(z1) a BLOCK at a time and sums dy * act'(z1) of each
    block in lanes, the blocks in float64: with ReLU and z1 = x - 0.1 (A = 1, B = 0),
    dy * act'(z1) is dy where x > 0.1, else 0."""
    dr, xr = _rows(1, 1000, np.float32, 6)[0], _rows(1, 1000, np.float32, 7)[0]
    m = np.float32(0.1)
    _, sum_dz = backward_kernels.reduce_row(dr, xr, m, np.float32(1), np.float32(0), CODES["relu"], np.float32(0))
    gated = np.where(xr - m > 0, dr, np.float32(0)).astype(np.float32)
    assert 0 < (xr - m > 0).sum() < xr.size
    block = backward_kernels.BLOCK
    assert sum_dz == sum(np.float64(lanes_sum(gated[lo:lo + block])) for lo in range(0, gated.size, block))


def _package_dispatchers():
    for info in pkgutil.iter_modules(numba_cpu.__path__):
        module = importlib.import_module(f"{numba_cpu.__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, numba.core.registry.CPUDispatcher) and value.py_func.__module__ == module.__name__:
                yield value


def test_no_package_kernel_reassociates():
    found = list(_package_dispatchers())
    assert len(found) > 50
    for dispatcher in found:
        fastmath = dispatcher.targetoptions.get("fastmath", False)
        assert fastmath is not True, dispatcher.py_func.__qualname__
        assert not fastmath or "reassoc" not in fastmath, dispatcher.py_func.__qualname__


_BACKWARD = """
import sys, torch
from groupnorm.backends import numba_cpu
g = torch.Generator().manual_seed(11)
x = torch.randn((2, 8, 13, 17), generator=g).to(torch.bfloat16)
dy = torch.randn((2, 8, 13, 17), generator=g).to(torch.bfloat16)
w, b = torch.randn(8, generator=g).to(torch.bfloat16), torch.randn(8, generator=g).to(torch.bfloat16)
_, mean, rstd = torch.ops.aten.native_group_norm(x.float(), None, None, 2, 8, 13 * 17, 4, 1e-5)
if sys.argv[1] == "two-stage":
    sums = numba_cpu.backward_reduce(dy, x, mean, rstd, w, b, None, None, 4, "mish")
else:
    sums = numba_cpu.backward_fused(dy, x, mean, rstd, w, b, None, None, 4, "mish")[:2]
torch.save(sums, sys.argv[2])
"""


@pytest.mark.parametrize("first", ["two-stage", "fused"])
def test_backward_sums_agree_across_processes_sharing_a_cache(tmp_path, first):
    """The CI flake of 2026-11-28, as it happened: one process compiles one backward
    path into an empty cache, a second compiles the other path beside the first one's
    cached callees. With reassociated sums the bfloat16 Mish sums of the two paths differed
    in the last bits; in lanes they cannot."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    second = "fused" if first == "two-stage" else "two-stage"
    for path in (first, second):
        subprocess.run([sys.executable, "-c", _BACKWARD, path, str(tmp_path / f"{path}.pt")], env=env, check=True,
                       capture_output=True, text=True)
    a, b = (torch.load(tmp_path / f"{path}.pt") for path in (first, second))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
