"""Channels-last Numba kernels: the per-sample forward and backward equal the pixel-block
ones bit for bit (the thread count picks between them), the cheaper bfloat16 store equals
bits.f32_to_bf16, and the staged activation paths match the reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

numba = pytest.importorskip("numba")

from groupnorm import reference  # noqa: E402
from helpers import assert_backward_matches_reference, reference_stats  # noqa: E402
from groupnorm.backends import numba_cpu  # noqa: E402
from groupnorm.backends.numba_cpu import bits, launch  # noqa: E402
from groupnorm.backends.numba_cpu.activations import CODES  # noqa: E402
from groupnorm.backends.numba_cpu.entries import backward_channels_last, backward_samples  # noqa: E402
from groupnorm.backends.numba_cpu.fast_store import f32_to_bf16_fast  # noqa: E402
from groupnorm.backends.numba_cpu.forward_kernels import forward_pixel_blocks, forward_samples  # noqa: E402
from groupnorm.backends.numba_cpu.stats_kernels import stats_channels_last  # noqa: E402

LOW_HALVES = torch.tensor([0, 1, 0x0FFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0xFFFF])


@numba.njit(cache=False)
def _fast_bits(x):
    out = np.empty(x.size, np.uint16)
    for i in range(x.size):
        out[i] = f32_to_bf16_fast(x[i])
    return out


def test_fast_bf16_store_equals_reference_rounding():
    hi = torch.arange(65536, dtype=torch.int64) << 16
    probe = (hi[:, None] | LOW_HALVES[None, :]).reshape(-1).to(torch.int32).view(torch.float32).numpy()
    assert np.array_equal(_fast_bits(probe), bits.f32_to_bf16_bits_array(probe))


def _cl(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (-2.3 + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


# (shape, groups): several statistics tasks per sample, a ragged last block, C/G = 1.
SHAPES = [((3, 64, 48, 40), 8), ((2, 320, 21, 19), 32), ((2, 24, 7, 5), 24), ((2, 600, 9, 7), 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("act,scaled", [("none", False), ("silu", True), ("gelu", False)])
def test_forward_paths_bitwise_equal(shape, groups, dtype, act, scaled):
    x = _cl(shape, dtype, 0)
    n, c = shape[:2]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(1)
    w_t = (1 + 0.3 * torch.randn(c, generator=g)).to(dtype)
    b_t = (0.2 * torch.randn(c, generator=g)).to(dtype)
    w, b = launch.param(w_t, acc), launch.param(b_t, acc)   # half types: raw bits
    adt = np.float64 if dtype == torch.float64 else np.float32
    empty = np.empty(0, adt)
    s = launch.param(0.3 * torch.randn(n, c, generator=g), acc) if scaled else empty
    t = launch.param(0.3 * torch.randn(n, c, generator=g), acc) if scaled else empty
    xv = launch.pixels_view(x)
    outs = []
    # pixel blocks in 1, 2 and 3 thread runs (each pass's tasks split differently)
    for path in ("samples", 1, 2, 3):
        y = torch.full_like(x, float("nan"))
        mean = np.full((n, groups), np.nan, adt)
        rstd = np.full((n, groups), np.nan, adt)
        if path == "samples":
            forward_samples(xv, launch.pixels_view(y), w, b, s, t, 1e-5, CODES[act], mean, rstd)
        else:
            forward_pixel_blocks(xv, launch.pixels_view(y), w, b, s, t, 1e-5, CODES[act], adt(0),
                                 mean, rstd, None, path)
        outs.append((y, torch.from_numpy(mean), torch.from_numpy(rstd)))
    for other in outs[1:]:
        for a_, b_ in zip(outs[0], other):
            assert torch.equal(a_, b_)
    m = np.empty((n, groups), adt)
    m2 = np.empty((n, groups), adt)
    stats_channels_last(xv, groups, m, m2, adt(0), 2)
    assert torch.equal(torch.from_numpy(m), outs[0][1])
    sc = None if not scaled else torch.from_numpy(s).view(n, c).double()
    sh = None if not scaled else torch.from_numpy(t).view(n, c).double()
    ry, rmean, _ = reference.forward(x.double(), w_t.double(), b_t.double(),
                                     sc, sh, groups, 1e-5, act)
    tol = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(outs[0][0].double(), ry, atol=tol, rtol=tol)
    torch.testing.assert_close(outs[0][1].double(), rmean, atol=1e-5 if dtype != torch.float64 else 1e-12,
                               rtol=1e-5)


@pytest.mark.parametrize("shape,groups", SHAPES[1:])
@pytest.mark.parametrize("act", ["silu", "mish"])
def test_backward_staged_activations(shape, groups, act):
    """reduce/dx stage several pixels per activation call (C below and above BLOCK)."""
    x = _cl(shape, torch.float32, 0)
    dy = _cl(shape, torch.float32, 3)
    n, c = shape[:2]
    xd = x.double()
    rmean, rm2 = reference.stats(xd, groups)
    count = x.numel() // (n * groups)
    rrstd = reference.rstd_from_m2(rm2, count, 1e-5)
    w = 1 + 0.3 * torch.randn(c, generator=torch.Generator().manual_seed(2))
    b = 0.2 * torch.randn(c, generator=torch.Generator().manual_seed(4))
    s1, s0 = numba_cpu.backward_reduce(dy, x, rmean.float(), rrstd.float(), w, b, None, None, groups, act)
    rs1, rs0 = reference.backward_reduce(dy.double(), xd, rmean, rrstd, w.double(), b.double(), None, None,
                                         groups, act)
    hw = x.numel() // (n * c)
    torch.testing.assert_close(s1.double(), rs1, atol=4e-4 * hw ** 0.5, rtol=1e-4)
    torch.testing.assert_close(s0.double(), rs0, atol=4e-4 * hw ** 0.5, rtol=1e-4)
    k = w.double().expand(n, c)
    g1 = (rs0 * k).view(n, groups, -1).sum(-1)
    g2 = (rs1 * k).view(n, groups, -1).sum(-1)
    dx = numba_cpu.backward_dx(dy, x, rmean.float(), rrstd.float(), w, b, None, None, g1.float(), g2.float(),
                               count, groups, act)
    rdx = reference.backward_dx(dy.double(), xd, rmean, rrstd, w.double(), b.double(), None, None, g1, g2,
                                count, groups, act)
    assert dx.stride() == x.stride()
    torch.testing.assert_close(dx.double(), rdx, atol=4e-4, rtol=4e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("act,scaled,affine", [("none", False, True), ("silu", True, True), ("gelu", False, False)])
def test_backward_paths_bitwise_equal(shape, groups, dtype, act, scaled, affine):
    """entries.backward_samples (one task per sample) against backward_channels_last (pixel
    blocks, two parallel stages, in 1, 2 and 3 thread runs): the same dx, (N, C) sums,
    dweight and dbias bits, every output NaN-poisoned first; and against the float64
    reference."""
    x = _cl(shape, dtype, 5)
    dy = _cl(shape, dtype, 6)
    n, c = shape[:2]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    adt = np.float64 if dtype == torch.float64 else np.float32
    g = torch.Generator().manual_seed(7)
    w_t = (1 + 0.3 * torch.randn(c, generator=g)).to(dtype) if affine else None
    b_t = (0.2 * torch.randn(c, generator=g)).to(dtype) if affine else None
    empty = np.empty(0, adt)
    w = launch.param(w_t, acc) if affine else empty
    b = launch.param(b_t, acc) if affine else empty
    s = launch.param(0.3 * torch.randn(n, c, generator=g), acc) if scaled else empty
    t = launch.param(0.3 * torch.randn(n, c, generator=g), acc) if scaled else empty
    rmean, rrstd, mean, rstd = reference_stats(x, groups, acc)
    outs = []
    for threads in (None, 1, 2, 3):   # None: per sample; else pixel blocks in that many runs
        dx = torch.full_like(x, float("nan"))
        s1 = np.full((n, c), np.nan, adt)
        s0 = np.full((n, c), np.nan, adt)
        dw = np.full(c if affine else 0, np.nan, adt)
        db = np.full(c if affine else 0, np.nan, adt)
        args = (launch.pixels_view(dy), launch.pixels_view(x), launch.pixels_view(dx), mean, rstd, w, b, s, t,
                CODES[act], True)
        if threads is None:
            backward_samples(*args, adt(0), s1, s0, dw, db)
        else:
            backward_channels_last(*args, None, adt(0), s1, s0, dw, db, threads)
        outs.append((dx, torch.from_numpy(s1), torch.from_numpy(s0), torch.from_numpy(dw), torch.from_numpy(db)))
    for other in outs[1:]:
        for a_, b_ in zip(outs[0], other):
            assert torch.equal(a_, b_)   # NaN anywhere (an unwritten element) fails too
    sc = None if not scaled else torch.from_numpy(s).view(n, c).double()
    sh = None if not scaled else torch.from_numpy(t).view(n, c).double()
    wd = None if not affine else w_t.double()
    bd = None if not affine else b_t.double()
    assert_backward_matches_reference(outs[0], dy, x, rmean, rrstd, wd, bd, sc, sh, groups, act)
