"""Numba CPU backend against groupnorm.reference (on float64 copies) and torch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

numba = pytest.importorskip("numba")

from groupnorm import reference  # noqa: E402
from groupnorm.backends import numba_cpu  # noqa: E402
from groupnorm.backends.numba_cpu import alloc, bits  # noqa: E402

ACTIVATIONS = ("none", "silu", "gelu", "gelu_tanh", "relu", "mish")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Absolute tolerance on O(1) outputs: a few roundings of the output dtype.
ATOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 4e-3}
STATS_ATOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-5, torch.float16: 1e-5}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output starts NaN-filled, so an element the kernel forgets to write fails."""
    monkeypatch.setattr(alloc, "empty_like", lambda x: torch.full_like(x, float("nan")))

    def nan_output(x, channels_last):
        t = torch.full_like(x, float("nan"))   # keeps x's memory format
        return t, alloc.memory_order(t, channels_last)

    monkeypatch.setattr(alloc, "output_like", nan_output)
    monkeypatch.setattr(alloc, "output_tensor_like",
                        lambda x, channels_last: (torch.full_like(x, float("nan")), None))
    monkeypatch.setattr(alloc, "output_known", lambda x, *facts: torch.full_like(x, float("nan")))
    monkeypatch.setattr(alloc, "empty", lambda shape, dtype: torch.full(shape, float("nan"), dtype=dtype))

    def nan_pair(shape, dtype):
        t = torch.full(shape, float("nan"), dtype=dtype)
        return t, t.numpy()

    monkeypatch.setattr(alloc, "empty_pair", nan_pair)


def make_x(shape, dtype, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (-2.3 + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        assert not x.is_contiguous() or x.shape[1] == 1
    return x


def make_params(c, n, dtype, affine=True, scaled=False, param_dtype=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    pd = param_dtype or dtype
    w = b = s = t = None
    if affine:
        w = (1 + 0.3 * torch.randn(c, generator=g, dtype=torch.float64)).to(pd)
        b = (0.2 * torch.randn(c, generator=g, dtype=torch.float64)).to(pd)
    if scaled:
        s = (0.3 * torch.randn(n, c, generator=g, dtype=torch.float64)).to(torch.float32)
        t = (0.3 * torch.randn(n, c, generator=g, dtype=torch.float64)).to(torch.bfloat16)
    return w, b, s, t


def f64(t):
    return None if t is None else t.double()


def same_layout(out, x):
    assert out.shape == x.shape and out.dtype == x.dtype and out.stride() == x.stride()


CASES = [
    ((3, 15, 17, 23), 5, False),      # odd sizes, C/G = 3
    ((3, 15, 17, 23), 5, True),
    ((2, 16, 7, 9), 1, False),        # C/G = 16
    ((2, 16, 7, 9), 16, True),        # C/G = 1
    ((2, 10, 3, 4, 5), 2, True),      # 5-D channels_last_3d, C/G = 5
    ((2, 10, 3, 4, 5), 2, False),
    ((4, 6), 3, False),               # no spatial dims
    ((2, 6, 37), 3, True),            # 3-D channels-last analogue
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups,cl", CASES)
def test_forward_matches_reference_and_torch(shape, groups, cl, dtype):
    x = make_x(shape, dtype, cl)
    w, b, _, _ = make_params(shape[1], shape[0], dtype)
    y, mean, rstd = numba_cpu.forward(x, w, b, None, None, groups, 1e-5, "none")
    same_layout(y, x)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == acc and rstd.dtype == acc and mean.shape == (shape[0], groups)
    ry, rmean, rrstd = reference.forward(x.double(), f64(w), f64(b), None, None, groups, 1e-5, "none")
    torch.testing.assert_close(y.double(), ry, atol=ATOL[dtype], rtol=0)
    torch.testing.assert_close(mean.double(), rmean, atol=STATS_ATOL[dtype], rtol=1e-5)
    torch.testing.assert_close(rstd.double(), rrstd, atol=STATS_ATOL[dtype], rtol=1e-5)
    ty = F.group_norm(x, groups, w, b, 1e-5)
    torch.testing.assert_close(y.double(), ty.double(), atol=2 * ATOL[dtype], rtol=0)


@pytest.mark.parametrize("shape,groups,cl,dtype,act,scaled",
                         [case + (dtype, "none", False) for case in CASES for dtype in DTYPES]
                         + [case + (torch.float32, "silu", True) for case in CASES[:2]])
def test_forward_output_is_forwards_y(shape, groups, cl, dtype, act, scaled):
    """The inference entry (statistics never made tensors) writes every element of the same y."""
    x = make_x(shape, dtype, cl, seed=3)
    w, b, s, t = make_params(shape[1], shape[0], dtype, scaled=scaled, seed=4)
    y = numba_cpu.forward_output(x, w, b, s, t, groups, 1e-5, act)
    same_layout(y, x)
    want = numba_cpu.forward(x, w, b, s, t, groups, 1e-5, act)[0]
    assert not torch.isnan(y).any()
    assert torch.equal(y, want)
    ry = reference.forward(x.double(), f64(w), f64(b), f64(s), f64(t), groups, 1e-5, act)[0]
    torch.testing.assert_close(y.double(), ry, atol=2 * ATOL[dtype], rtol=0)


@pytest.mark.parametrize("shape,groups,cl", CASES)
@pytest.mark.parametrize("dtype,param_dtype,act", [(d, d, "none") for d in DTYPES]
                         + [(torch.bfloat16, torch.float32, "gelu"), (torch.float32, torch.float32, "silu")])
def test_forward_known_is_forwards_y(shape, groups, cl, dtype, param_dtype, act):
    """The everyday entry (facts read by the caller, passed in) writes every element of
    forward's y, for both layouts, every dtype, parameters in float32 for a half x."""
    x = make_x(shape, dtype, cl, seed=5)
    w, b, _, _ = make_params(shape[1], shape[0], dtype, param_dtype=param_dtype, seed=6)
    y = numba_cpu.forward_known(x, x.shape, x.dtype, x.numel(), cl, w, b, groups, 1e-5, act)
    same_layout(y, x)
    assert not torch.isnan(y).any()
    assert torch.equal(y, numba_cpu.forward(x, w, b, None, None, groups, 1e-5, act)[0])
    ry = reference.forward(x.double(), f64(w), f64(b), None, None, groups, 1e-5, act)[0]
    torch.testing.assert_close(y.double(), ry, atol=2 * ATOL[dtype], rtol=0)


@pytest.mark.parametrize("shape,groups,cl", CASES + [((2, 32, 4, 4), 8, False)])   # the last: N*G >= 8, fused
@pytest.mark.parametrize("dtype,param_dtype,act", [(d, d, "none") for d in DTYPES]
                         + [(torch.bfloat16, torch.float32, "silu")])
def test_known_pair_gives_backward_grads_bits(shape, groups, cl, dtype, param_dtype, act):
    """forward_known_stats + backward_known (the everyday autograd pair: facts and numpy
    statistics handed over, the statistics' address from the forward entry) write every
    element of the same y, dx, dweight, dbias as forward + backward_grads; a gradient
    not asked for is None; dy of another layout is read correctly."""
    x = make_x(shape, dtype, cl, seed=8)
    dy = make_x(shape, dtype, not cl and len(shape) in (4, 5), seed=9)   # the other layout where one exists
    w, b, _, _ = make_params(shape[1], shape[0], dtype, param_dtype=param_dtype, seed=10)
    facts = (x.shape, x.dtype, x.numel(), cl)
    y, stats, stats_at = numba_cpu.forward_known_stats(x, *facts, w, b, groups, 1e-5, act)
    want_y, mean, rstd = numba_cpu.forward(x, w, b, None, None, groups, 1e-5, act)
    assert torch.equal(y, want_y)
    assert np.array_equal(stats[0], mean.numpy()) and np.array_equal(stats[1], rstd.numpy())
    dx, dw, db = numba_cpu.backward_known(dy, x, stats, stats_at, w, b, *facts, groups, act, True, True, True)
    want = numba_cpu.backward_grads(dy, x, mean, rstd, w, b, None, None, groups, act, True)
    same_layout(dx, x)
    for got, ref in zip((dx, dw, db), want[:3]):
        assert got.dtype == ref.dtype and not torch.isnan(got).any()
        assert torch.equal(got, ref)
    only_w = numba_cpu.backward_known(dy, x, stats, stats_at, w, b, *facts, groups, act, False, True, False)
    assert only_w[0] is None and only_w[2] is None and torch.equal(only_w[1], want[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups,cl", CASES[:2] + CASES[4:5] + CASES[6:7])
def test_stats(shape, groups, cl, dtype):
    x = make_x(shape, dtype, cl)
    mean, m2 = numba_cpu.stats(x, groups)
    rmean, rm2 = reference.stats(x.double(), groups)
    torch.testing.assert_close(mean.double(), rmean, atol=STATS_ATOL[dtype], rtol=1e-5)
    torch.testing.assert_close(m2.double(), rm2, atol=1e-4, rtol=1e-5)


def _all_functions(x, w, b, s, t, groups, act, dtype):
    """Run apply, backward_reduce, backward_dx and compare each with the reference."""
    n = x.shape[0]
    xd = x.double()
    rmean, rm2 = reference.stats(xd, groups)
    count = x.numel() // (n * groups)
    rrstd = reference.rstd_from_m2(rm2, count, 1e-5)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean, rstd = rmean.to(acc), rrstd.to(acc)
    args = (f64(w), f64(b), f64(s), f64(t))

    y = numba_cpu.apply(x, mean, rstd, w, b, s, t, groups, act)
    same_layout(y, x)
    ry = reference.apply(xd, rmean, rrstd, *args, groups, act)
    torch.testing.assert_close(y.double(), ry, atol=ATOL[dtype], rtol=ATOL[dtype])

    dy = make_x(x.shape, dtype, not x.is_contiguous(), seed=7)
    s1, s0 = numba_cpu.backward_reduce(dy, x, mean, rstd, w, b, s, t, groups, act)
    rs1, rs0 = reference.backward_reduce(dy.double(), xd, rmean, rrstd, *args, groups, act)
    hw = x.numel() // (n * x.shape[1])
    tol = ATOL[dtype] * max(hw, 1) ** 0.5 * 4
    torch.testing.assert_close(s1.double(), rs1, atol=tol, rtol=ATOL[dtype])
    torch.testing.assert_close(s0.double(), rs0, atol=tol, rtol=ATOL[dtype])

    # group sums as the autograd layer forms them: sum over the group's channels of
    # dxhat-weighted terms, here from the reference sums (float64).
    k = torch.ones_like(rs1)
    if s is not None:
        k = k * (1 + s.double())
    if w is not None:
        k = k * w.double()
    g1 = (rs0 * k).view(n, groups, -1).sum(-1)
    g2 = (rs1 * k).view(n, groups, -1).sum(-1)
    dx = numba_cpu.backward_dx(dy, x, mean, rstd, w, b, s, t, g1.to(acc), g2.to(acc), count, groups, act)
    same_layout(dx, x)
    rdx = reference.backward_dx(dy.double(), xd, rmean, rrstd, *args, g1, g2, count, groups, act)
    torch.testing.assert_close(dx.double(), rdx, atol=ATOL[dtype] * 4, rtol=ATOL[dtype] * 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups,cl", CASES)
def test_apply_and_backward_plain(shape, groups, cl, dtype):
    x = make_x(shape, dtype, cl)
    w, b, _, _ = make_params(shape[1], shape[0], dtype)
    _all_functions(x, w, b, None, None, groups, "none", dtype)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("cl", [False, True])
def test_epilogue_every_activation(act, cl):
    x = make_x((2, 12, 5, 7), torch.float32, cl)
    w, b, s, t = make_params(12, 2, torch.float32, scaled=True)
    _all_functions(x, w, b, s, t, 4, act, torch.float32)
    y, _, _ = numba_cpu.forward(x, w, b, s, t, 4, 1e-5, act)
    ry, _, _ = reference.forward(x.double(), f64(w), f64(b), f64(s), f64(t), 4, 1e-5, act)
    torch.testing.assert_close(y.double(), ry, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cl", [False, True])
def test_half_with_float32_params_and_epilogue(dtype, cl):
    x = make_x((2, 12, 6, 5), dtype, cl)
    w, b, s, t = make_params(12, 2, dtype, scaled=True, param_dtype=torch.float32)
    _all_functions(x, w, b, s, t, 3, "silu", dtype)
    _all_functions(x, None, None, None, None, 3, "gelu", dtype)


def test_large_mean_is_stable():
    x = 1e4 + 1e-2 * torch.randn(2, 8, 32, 32, generator=torch.Generator().manual_seed(3))
    for xx in (x, x.to(memory_format=torch.channels_last)):
        y, _, _ = numba_cpu.forward(xx, None, None, None, None, 4, 1e-10, "none")  # eps << var
        std = y.reshape(2, 4, -1).double().std(dim=-1, unbiased=False)
        assert (std - 1).abs().max() < 1e-3


@pytest.mark.parametrize("groups", [1, 2])   # forward_rows (stats_rows) and forward_groups (row_moments)
def test_statistics_of_chunks_with_far_apart_means(groups):
    """Contiguous groups span several 4096-element chunks; the chunks after the first are
    summed around the first one's mean. Channel means far from it (and a large offset)
    must not cost accuracy: float32 statistics against float64."""
    g = torch.Generator().manual_seed(12)
    offsets = torch.tensor([1e4, 1e4 + 300.0, 1e4 - 7.0, 1e4 + 0.5, 0.0, 1e3, -50.0, 3.0])
    spreads = torch.tensor([1e-2, 1e-3, 1.0, 1e-2, 1.0, 1e-3, 10.0, 1e-2])
    x = offsets[:, None, None] + spreads[:, None, None] * torch.randn(8, 64, 64, generator=g)
    x = x.unsqueeze(0).repeat(4, 1, 1, 1)[:, :8]   # N = 4: N * G = 4 or 8 tasks
    _, mean, rstd = numba_cpu.forward(x, None, None, None, None, groups, 1e-10, "none")
    xd = x.double().reshape(4, groups, -1)
    torch.testing.assert_close(mean.double(), xd.mean(-1), rtol=2e-7, atol=0)
    want = (xd.var(-1, unbiased=False) + 1e-10).rsqrt()
    torch.testing.assert_close(rstd.double(), want, rtol=2e-6, atol=0)
    m, m2 = numba_cpu.stats(x, groups)   # the stats op: the same partials, the same bits
    assert torch.equal(m, mean)


@pytest.mark.parametrize("cl", [False, True])
def test_bitwise_deterministic_across_thread_counts(cl):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 numba threads")
    x = make_x((1, 64, 48, 40), torch.float32, cl)
    dy = make_x((1, 64, 48, 40), torch.float32, cl, seed=5)
    w, b, s, t = make_params(64, 1, torch.float32, scaled=True)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            numba.set_num_threads(threads)
            y, mean, rstd = numba_cpu.forward(x, w, b, s, t, 8, 1e-5, "silu")
            m, m2 = numba_cpu.stats(x, 8)
            s1, s0 = numba_cpu.backward_reduce(dy, x, mean, rstd, w, b, s, t, 8, "silu")
            g = s1.view(1, 8, 8).sum(-1)
            dx = numba_cpu.backward_dx(dy, x, mean, rstd, w, b, s, t, g, g, 48 * 40 * 8, 8, "silu")
            f1, f0, fdx = numba_cpu.backward_fused(dy, x, mean, rstd, w, b, s, t, 8, "silu")
            results.append([y, mean, rstd, m, m2, s1, s0, dx, f1, f0, fdx])
    finally:
        torch.set_num_threads(old)
    for a, b_ in zip(results[0], results[1]):
        assert torch.equal(a, b_)
    for a, b_ in zip(results[0], results[2]):
        assert torch.equal(a, b_)


FUSED_CASES = [
    ((2, 16, 7, 9), 4, False),        # N*G = 8: one task per group
    ((3, 15, 17, 23), 5, False),      # C/G = 3, odd sizes
    ((4, 6), 3, False),               # no spatial dims
    ((2, 16, 7, 9), 4, True),         # channels-last: the two-stage path
    ((1, 8, 5, 5), 2, False),         # N*G < 8: the two-stage path
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups,cl", FUSED_CASES)
@pytest.mark.parametrize("act,scaled", [("none", False), ("silu", True), ("mish", False)])
def test_backward_fused_matches_two_stages(shape, groups, cl, dtype, act, scaled):
    """backward_fused == backward_reduce (bitwise) and backward_dx (to rounding)."""
    from groupnorm import grad_terms

    x = make_x(shape, dtype, cl)
    dy = make_x(shape, dtype, cl, seed=7)
    w, b, s, t = make_params(shape[1], shape[0], dtype, scaled=scaled)
    _, mean, rstd = numba_cpu.forward(x, w, b, s, t, groups, 1e-5, act)
    s1, s0 = numba_cpu.backward_reduce(dy, x, mean, rstd, w, b, s, t, groups, act)
    g1, g2 = grad_terms.group_sums(s1, s0, w, s, groups)
    count = x.numel() // (shape[0] * groups)
    dx = numba_cpu.backward_dx(dy, x, mean, rstd, w, b, s, t, g1, g2, count, groups, act)
    f1, f0, fdx = numba_cpu.backward_fused(dy, x, mean, rstd, w, b, s, t, groups, act)
    assert torch.equal(f1, s1) and torch.equal(f0, s0)
    same_layout(fdx, x)
    torch.testing.assert_close(fdx.double(), dx.double(), atol=ATOL[dtype], rtol=ATOL[dtype])
    n1, n0, none = numba_cpu.backward_fused(dy, x, mean, rstd, w, b, s, t, groups, act, need_dx=False)
    assert none is None and torch.equal(n1, s1) and torch.equal(n0, s0)


ALL_BITS = torch.arange(65536, dtype=torch.int32).to(torch.int16)
# Every float32 whose top half is any of the 65536 patterns, with low halves that hit
# exact, halfway (ties), just-below/above-halfway and sticky-bit cases for both targets.
LOW_HALVES = torch.tensor([0, 1, 0x0FFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0xFFFF])


def _f32_probe():
    hi = torch.arange(65536, dtype=torch.int64) << 16
    return (hi[:, None] | LOW_HALVES[None, :]).reshape(-1).to(torch.int32).view(torch.float32)


def test_bf16_to_f32_exhaustive():
    got = bits.bf16_bits_to_f32_array(ALL_BITS.numpy().view(np.uint16))
    ref = ALL_BITS.view(torch.bfloat16).float().numpy()
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_f16_to_f32_exhaustive():
    got = bits.f16_bits_to_f32_array(ALL_BITS.numpy())
    ref = ALL_BITS.view(torch.float16).float().numpy()
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_f32_to_bf16_exhaustive():
    x = _f32_probe()
    got = bits.f32_to_bf16_bits_array(x.numpy())
    ref = x.bfloat16().view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x.numpy())
    assert np.array_equal(got[~nan], ref[~nan])
    # NaN: any quiet NaN is acceptable (torch's scalar and vector paths differ here).
    assert np.isnan(torch.from_numpy(got[nan].view(np.int16)).view(torch.bfloat16).float().numpy()).all()


def test_f32_to_f16_exhaustive():
    x = _f32_probe()
    got = bits.f32_to_f16_bits_array(x.numpy())
    ref = x.half().view(torch.int16).numpy()
    assert np.array_equal(got, ref)


def test_warmup_reports_seconds():
    seconds = numba_cpu.warmup(dtypes=(torch.float32,))
    assert seconds >= 0.0


def test_vectorised_exp_matches_float64_within_two_ulp():
    """The libm-free float32 exp behind the SiLU epilogue (activations.exp_neg_f32)."""
    from groupnorm.backends.numba_cpu.activations import exp_neg_f32

    z = np.concatenate([np.linspace(-86.0, 86.0, 200001), np.random.default_rng(0).normal(0, 5, 100000)])
    z = z.astype(np.float32)
    got = exp_neg_f32(z, z.size).astype(np.float64)
    want = np.exp(-z.astype(np.float64))
    rel = np.abs(got - want) / want
    assert rel.max() < 2.5 * np.finfo(np.float32).eps, rel.max()


def test_numba_threads_follow_torch_after_a_change():
    """threads.sync_with_torch memoises what it set; a change of torch's count still lands."""
    from groupnorm.backends.numba_cpu import threads

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 numba threads")
    old = torch.get_num_threads()
    try:
        for wanted in (1, 2, 1):
            torch.set_num_threads(wanted)
            assert threads.sync_with_torch(1 << 20) == wanted
            assert numba.get_num_threads() == wanted
        assert threads.sync_with_torch(10) == 1   # tiny inputs stay on the calling thread
    finally:
        torch.set_num_threads(old)


def test_first_kernel_call_keeps_torch_thread_count():
    """Numba's OpenMP pool start used to reset torch.set_num_threads(1) to all cores.
    Needs a fresh process: the pool starts once per process."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(1); import groupnorm; "
            "groupnorm.group_norm(torch.randn(2, 64, 32, 32), 8); print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "1"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,groups,cl", [((2, 16, 7, 9), 4, False), ((2, 16, 7, 9), 4, True),
                                             ((1, 8, 5, 5), 2, False)])
def test_half_params_read_and_written_as_bits(dtype, shape, groups, cl):
    """Half-type weight/bias reach the kernels as raw bits (no per-call conversion) and
    their gradients come back in their own dtype, equal to the float64 gradients."""
    from groupnorm.backends.numba_cpu import launch

    x = make_x(shape, dtype, cl)
    dy = make_x(shape, dtype, cl, seed=7)
    w, b, _, _ = make_params(shape[1], shape[0], dtype)
    view = launch.param(w, torch.float32)
    assert view.dtype.itemsize == 2 and np.shares_memory(view, w.view(torch.int16).numpy())
    y, mean, rstd = numba_cpu.forward(x, w, b, None, None, groups, 1e-5, "none")
    ry, _, _ = reference.forward(x.double(), f64(w), f64(b), None, None, groups, 1e-5, "none")
    torch.testing.assert_close(y.double(), ry, atol=ATOL[dtype], rtol=ATOL[dtype])
    dx, dw, db, ds, dt = numba_cpu.backward_grads(dy, x, mean, rstd, w, b, None, None, groups, "none")
    assert dw.dtype == dtype and db.dtype == dtype and ds is None and dt is None
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    F.group_norm(xd, groups, wd, bd, 1e-5).backward(dy.double())
    for got, ref in ((dw, wd.grad), (db, bd.grad), (dx, xd.grad)):
        assert not torch.isnan(got).any()
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(got.double(), ref, atol=ATOL[dtype] * 4 * scale, rtol=ATOL[dtype] * 2)


_FRESH_OR_CACHED = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_numba_backend import make_x, make_params
from groupnorm.backends import numba_cpu
x = make_x((2, 10, 3, 4, 5), torch.float16, True, seed=9)
dy = make_x((2, 10, 3, 4, 5), torch.float16, True, seed=10)
w, b, s, t = make_params(10, 2, torch.float16, scaled=True, seed=11)
groups = x.float().reshape(2, 2, -1)   # statistics from torch: only the backward compiles
mean = groups.mean(-1)
rstd = (groups.var(-1, unbiased=False) + 1e-5).rsqrt()
for g in numba_cpu.backward_grads(dy, x, mean, rstd, w, b, s, t, 2, "mish"):
    print(g.view(torch.int16).flatten().tolist())
"""


def test_gradients_are_the_same_compiled_fresh_or_loaded_from_the_cache(tmp_path):
    """Bitwise determinism across processes: the first process compiles the kernels
    (empty cache), the second loads them from the cache; both must write the same
    gradients. (With reassoc on the dx loops, the float16 Mish dx differed by 1 ulp in a
    few elements: LLVM regrouped the terms differently inside the cached caller.)"""
    import os
    import subprocess
    import sys

    code = _FRESH_OR_CACHED.format(tests=os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1]
