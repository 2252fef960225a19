"""Contiguous per-group kernels: small groups run a block at a time (statistics, then
apply; sums, then dx) in per-thread runs of groups (forward_kernels.groups_run,
backward_kernels.fused_groups_run). Neither the blocking nor the number of runs may
change a bit, every output element must be written, and the results must match the
float64 reference. The run count is the kernels' ``threads`` argument: more runs than
Numba threads is allowed, so 3 and 7 runs test other partitions on any machine."""
from __future__ import annotations

import numpy as np
import pytest
import torch

numba = pytest.importorskip("numba")

from groupnorm import reference  # noqa: E402
from helpers import assert_backward_matches_reference, reference_stats  # noqa: E402
from groupnorm.backends.numba_cpu import launch  # noqa: E402
from groupnorm.backends.numba_cpu.activations import CODES  # noqa: E402
from groupnorm.backends.numba_cpu.backward_kernels import GROUP_BLOCK_ELEMS as BACKWARD_BLOCK  # noqa: E402
from groupnorm.backends.numba_cpu.entries import backward_rows_fused  # noqa: E402
from groupnorm.backends.numba_cpu.forward_kernels import GROUP_BLOCK_ELEMS, forward_groups  # noqa: E402

# (shape, groups): many groups per block (9, 32 and 48 elements, one with HW = 1), a few
# per block with a ragged last block, and groups larger than a block (one per block).
SHAPES = [((64, 32, 3, 3), 32), ((7, 96, 2, 2), 8), ((12, 48), 1), ((5, 24, 21, 23), 6),
          ((2, 8, 96, 100), 2)]
RUNS = (1, 2, 3, 7)
TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2}


def _x(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (1.7 + 0.6 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def _params(c, n, dtype, affine, scaled, acc):
    g = torch.Generator().manual_seed(3)
    adt = np.float64 if acc == torch.float64 else np.float32
    empty = np.empty(0, adt)
    w_t = (1 + 0.3 * torch.randn(c, generator=g)).to(dtype) if affine else None
    b_t = (0.2 * torch.randn(c, generator=g)).to(dtype) if affine else None
    s_t = 0.3 * torch.randn(n, c, generator=g) if scaled else None
    t_t = 0.3 * torch.randn(n, c, generator=g) if scaled else None
    arrays = [empty if t is None else launch.param(t, acc) for t in (w_t, b_t, s_t, t_t)]
    return (w_t, b_t, s_t, t_t), arrays


def test_the_shapes_cover_blocks_of_many_groups_and_groups_larger_than_a_block():
    sizes = [int(np.prod(shape[1:])) // groups for shape, groups in SHAPES]
    assert min(sizes) * 8 <= GROUP_BLOCK_ELEMS and max(sizes) > GROUP_BLOCK_ELEMS == BACKWARD_BLOCK


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("act,scaled", [("none", False), ("silu", True)])
def test_forward_bits_do_not_depend_on_blocks_or_runs(shape, groups, dtype, act, scaled):
    x = _x(shape, dtype, 0)
    n, c = shape[:2]
    hw = x.numel() // (n * c)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    adt = np.float64 if dtype == torch.float64 else np.float32
    tensors, (w, b, s, t) = _params(c, n, dtype, True, scaled, acc)
    xg = launch.rows_view(x, n * groups)
    outs = []
    for runs in RUNS:
        y = torch.full_like(x, float("nan"))
        mean = np.full((n, groups), np.nan, adt)
        rstd = np.full((n, groups), np.nan, adt)
        forward_groups(xg, launch.rows_view(y, n * groups), hw, w, b, s, t, 1e-5, CODES[act], adt(0), mean, rstd,
                       None, runs)
        outs.append((y, torch.from_numpy(mean), torch.from_numpy(rstd)))
    for other in outs[1:]:
        for a_, b_ in zip(outs[0], other):
            assert torch.equal(a_, b_)   # a NaN left anywhere (an unwritten element) fails too
    w_t, b_t, s_t, t_t = tensors
    ry, rmean, _ = reference.forward(x.double(), w_t.double(), b_t.double(),
                                     None if s_t is None else s_t.double(), None if t_t is None else t_t.double(),
                                     groups, 1e-5, act)
    tol = TOL[dtype]
    torch.testing.assert_close(outs[0][0].double(), ry, atol=tol, rtol=tol)
    torch.testing.assert_close(outs[0][1].double(), rmean, atol=1e-5 if dtype != torch.float64 else 1e-12,
                               rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("act,scaled,affine", [("none", False, True), ("silu", True, True), ("gelu", False, False)])
def test_backward_bits_do_not_depend_on_blocks_or_runs(shape, groups, dtype, act, scaled, affine):
    x = _x(shape, dtype, 5)
    dy = _x(shape, dtype, 6) - 1.7
    n, c = shape[:2]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    adt = np.float64 if dtype == torch.float64 else np.float32
    (w_t, b_t, s_t, t_t), (w, b, s, t) = _params(c, n, dtype, affine, scaled, acc)
    rmean, rrstd, mean, rstd = reference_stats(x, groups, acc)
    outs = []
    for runs in RUNS:
        dx = torch.full_like(x, float("nan"))
        s1 = np.full(n * c, np.nan, adt)
        s0 = np.full(n * c, np.nan, adt)
        dw = np.full(c if affine else 0, np.nan, adt)
        db = np.full(c if affine else 0, np.nan, adt)
        backward_rows_fused(launch.rows_view(dy, n * c), launch.rows_view(x, n * c), launch.rows_view(dx, n * c),
                            c // groups, mean, rstd, w, b, s, t, CODES[act], True, None, adt(0), s1, s0, dw, db, runs)
        outs.append((dx, torch.from_numpy(s1), torch.from_numpy(s0), torch.from_numpy(dw), torch.from_numpy(db)))
    for other in outs[1:]:
        for a_, b_ in zip(outs[0], other):
            assert torch.equal(a_, b_)
    assert_backward_matches_reference(outs[0], dy, x, rmean, rrstd, *[None if v is None else v.double()
                                                                        for v in (w_t, b_t, s_t, t_t)], groups, act)


def test_many_short_rows_run_on_every_thread():
    """threads.sync_with_torch counts rows as well as elements: 8x1024 (8192 elements in
    8192 rows of one) is worth two threads, 1x8x32x32 (8 rows of 1024) is not."""
    from groupnorm.backends.numba_cpu import threads

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        if threads._POOL_SIZE < 2:
            pytest.skip("needs 2 numba threads")
        assert threads.sync_with_torch(8192, 8192) == 2
        assert threads.sync_with_torch(8192, 8) == 1
        assert threads.sync_with_torch(1 << 20) == 2
    finally:
        torch.set_num_threads(old)
