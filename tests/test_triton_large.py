"""One-pass kernels for large groups (onepass_*.py) vs the float64 reference.

Without CUDA they run through the Triton interpreter, which runs programs one after
another: the barrier kernel (PHASE 0) cannot complete there when a row has several
programs, so these tests drive the barrier-free pair (MODE "pair": the same helpers,
partials then merge + apply) with tiles and grids forced small, so several programs share
each group, rows come in waves, and big rows stream. PHASE 0 itself runs here only with one
program per row (the barrier arithmetic for one arrival, and its self-reset); the GPU script
(benchmarks/gpu_large.py) checks it against the pair bit for bit.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from groupnorm import grad_terms, reference  # noqa: E402
from groupnorm.backends.triton_gpu import launch, onepass_launch, onepass_plan, plan  # noqa: E402
from groupnorm.backends.triton_gpu.onepass_kernels import row_base, tile_offsets  # noqa: E402
import groupnorm.backends.triton_gpu as tg  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
EPS = 1e-5


def _nan_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def small_onepass(monkeypatch):
    """Outputs and scratch start as NaN; one-pass path on; tiles of 64 elements."""
    monkeypatch.setattr(launch, "empty", _nan_empty)
    monkeypatch.setattr(launch, "empty_like", lambda x: torch.empty_like(x).fill_(float("nan")))
    monkeypatch.setattr(onepass_launch, "scratch", _nan_empty)
    monkeypatch.setattr(onepass_launch, "MODE", "pair")
    monkeypatch.setattr(plan, "FUSED_MAX_GROUP", 0)
    monkeypatch.setattr(plan, "GROUP_MAX_GROUP", 0)   # the one-program-per-group path of small groups
    monkeypatch.setattr(plan, "CPU_NUM_SMS", 4)
    monkeypatch.setattr(onepass_plan, "TILE", 64)
    monkeypatch.setattr(onepass_plan, "TILE_BWD", 32)
    monkeypatch.setattr(onepass_plan, "RESIDENT_PER_SM", 2)
    monkeypatch.setattr(onepass_plan, "SPAN_MIN_BYTES", 16)
    onepass_launch._too_large.clear()
    onepass_launch._proven.clear()


# Plans the cases take (with the fixture's knobs): "hold" keeps each tile across the merge,
# several programs per group, rows in waves; "stream" makes rows larger than the grid (K > 1,
# the second read) with one row per wave (L2 budget); "wide" forces int64 offsets and merges
# the partials one at a time (the chunked merge's loop).
CONFIGS = {
    "hold": {},
    "stream": {"TILE": 32, "RESIDENT_PER_SM": 1, "CPU_L2_BYTES": 64, "CPU_NUM_SMS": 2},
    "wide": {"FORCE_WIDE": True, "MERGE_TILE": 1, "MERGE_MIN": 1},
}


def _configure(monkeypatch, config):
    for name, value in CONFIGS[config].items():
        monkeypatch.setattr(plan if name == "CPU_NUM_SMS" else onepass_plan, name, value)


def _inputs(shape, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (-2.3 + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        x, dy = (t.movedim(1, -1).contiguous().movedim(-1, 1) for t in (x, dy))
    n, c = shape[:2]
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = (1.0 + 0.3 * torch.randn(c, generator=g)).to(pdt)
    b = (0.2 * torch.randn(c, generator=g)).to(pdt)
    sc = (0.3 * torch.randn(n, c, generator=g)).to(pdt)
    sh = (0.3 * torch.randn(n, c, generator=g)).to(pdt)
    return [t.to(DEVICE) for t in (x, w, b, sc, sh, dy)]


def _d(t):
    return None if t is None else t.double().cpu()


def _close(ours, ref, dtype, what):
    ours = ours.double().cpu()
    assert not torch.isnan(ours).any(), f"{what}: unwritten (NaN) elements"
    rtol = RTOL[dtype]
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=rtol * max(1.0, ref.abs().max().item()),
                               msg=lambda m: f"{what}: {m}")


def _check(x, w, b, sc, sh, dy, groups, activation):
    """Forward and every gradient against the float64 reference; returns all outputs."""
    dtype = x.dtype
    xd, wd, bd, scd, shd, dyd = map(_d, (x, w, b, sc, sh, dy))
    y, mean, rstd = tg.forward(x, w, b, sc, sh, groups, EPS, activation)
    y_r, mean_r, rstd_r = reference.forward(xd, wd, bd, scd, shd, groups, EPS, activation)
    assert y.stride() == x.stride() and y.dtype == dtype
    _close(y, y_r, dtype, "y")
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    _close(mean, mean_r, stat, "mean")
    _close(rstd, rstd_r, stat, "rstd")

    a, bsum = reference.backward_reduce(dyd, xd, mean.double().cpu(), rstd.double().cpu(), wd, bd, scd, shd,
                                        groups, activation)
    sdx, sdxx = grad_terms.group_sums(a, bsum, wd, scd, groups)
    count = x.numel() // (x.shape[0] * groups)
    dx_r = reference.backward_dx(dyd, xd, mean.double().cpu(), rstd.double().cpu(), wd, bd, scd, shd,
                                 sdx, sdxx, count, groups, activation)
    want = (dx_r,) + tuple(grad_terms.param_grads(a, bsum, wd, bd, scd, shd))
    got = tg.backward_grads(dy, x, mean, rstd, w, b, sc, sh, groups, activation, True)
    for ours, ref, param, name in zip(got, want, (x, w, b, sc, sh), ("dx", "dw", "db", "dscale", "dshift")):
        if param is None:
            assert ours is None, name
            continue
        assert ours.shape == param.shape and ours.dtype == param.dtype, name
        _close(ours, ref, param.dtype, name)
    assert got[0].stride() == x.stride()
    return (y, mean, rstd) + tuple(t for t in got if t is not None)


# (shape, groups, channels_last): NCHW with a power-of-two and an odd C/G (3-D); channels-last
# with spans of 2 groups (of 4), of all 6 groups in float16 (a masked span: 8 lanes, 16
# channels for 12) or one group in float64, and all of C (5-D).
CASES = [
    ((2, 8, 5, 7), 4, False),
    ((1, 12, 54), 4, False),
    ((2, 8, 5, 7), 4, True),
    ((1, 12, 4, 9), 6, True),
    ((2, 6, 3, 3, 5), 2, True),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _cases():
    out = []
    for i, dtype in enumerate(DTYPES):
        for j, config in enumerate(CONFIGS):
            shape, groups, cl = CASES[(i + 2 * j) % len(CASES)]
            act = ["silu", "none", "gelu", "mish"][(i + j) % 4]
            out.append(pytest.param(shape, groups, cl, dtype, config, act,
                                    id=f"{config}-{str(dtype)[6:]}-{'cl' if cl else 'nchw'}-{groups}g-{act}"))
    return out


@pytest.mark.parametrize("shape,groups,channels_last,dtype,config,activation", _cases())
def test_against_reference(monkeypatch, shape, groups, channels_last, dtype, config, activation):
    _configure(monkeypatch, config)
    x = _inputs(shape, dtype, channels_last)[0]
    n, c = shape[:2]
    p = onepass_plan.onepass_plan(n, c, x.numel() // (n * c), groups, channels_last, x.element_size(),
                                  plan.CPU_NUM_SMS, onepass_plan.CPU_L2_BYTES)
    assert p.split > 1  # several programs share each group
    if config == "stream":
        assert p.k > 1 and p.rows_per_wave == 1 and p.waves == p.rows
    if config == "wide":
        assert p.wide and p.merge_s == 1
    _check(*_inputs(shape, dtype, channels_last), groups, activation)


def test_spans_and_plans_the_cases_take():
    # The cases above do reach spans of several groups, masked spans and waves.
    p = onepass_plan.onepass_plan(1, 12, 36, 6, True, 4, 4, 1 << 20)
    assert (p.span_g, p.block_g, p.block_c) == (2, 2, 4)
    p = onepass_plan.onepass_plan(1, 12, 36, 6, True, 2, 4, 1 << 20)
    assert (p.span_g, p.block_g, p.block_c) == (6, 8, 16)  # masked groups and channels
    assert onepass_plan.onepass_plan(2, 6, 45, 2, True, 4, 4, 1 << 20).span_g == 2  # all of C
    assert onepass_plan.onepass_plan(2, 8, 35, 4, False, 4, 4, 1 << 20).waves > 1


@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
def test_epilogue_without_affine_or_scale(activation):
    x, w, b, sc, sh, dy = _inputs((1, 8, 5, 7), torch.float32, activation == "relu")
    if activation == "relu":
        _check(x, w, None, sc, None, dy, 4, activation)
    else:
        _check(x, None, None, None, None, dy, 4, activation)


def test_bitwise_repeatable_and_wide_offsets_agree(monkeypatch):
    args = _inputs((1, 8, 5, 7), torch.float32, False)
    first = _check(*args, 4, "silu")
    again = _check(*args, 4, "silu")
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    monkeypatch.setattr(onepass_plan, "FORCE_WIDE", True)  # int64 offsets: the same sums
    wide = _check(*args, 4, "silu")
    assert all(torch.equal(a, b) for a, b in zip(first, wide))


def test_large_offset_stays_large_in_int64():
    """The offset helpers on values past 2^31 (what a >2^31-element tensor needs)."""
    @triton.jit
    def offsets_kernel(out_ptr, n, sp, stride_n, stride_c, stride_hw, hw0, HW, SPAN_C: tl.constexpr):
        base = row_base(n.to(tl.int64), sp, stride_n, stride_c, SPAN_C)
        offs, mask = tile_offsets(hw0, HW, SPAN_C, stride_c, stride_hw, 4, 2, True)
        tl.store(out_ptr + tl.arange(0, 8), tl.reshape(base + offs, [8]))

    out = torch.zeros(8, dtype=torch.int64, device=DEVICE)
    n, sp, stride_n, stride_c, stride_hw, hw0, span_c = 3, 5, 2**31 + 7, 1, 4099, 2**30 + 1, 4
    offsets_kernel[(1,)](out, n, sp, stride_n, stride_c, stride_hw, hw0, 2**31 - 1, SPAN_C=span_c)
    want = [n * stride_n + sp * span_c * stride_c + cc * stride_c + (hw0 + h) * stride_hw
            for cc in range(4) for h in range(2)]
    assert out.cpu().tolist() == want


def test_barrier_kernel_with_one_program_per_row(monkeypatch):
    """PHASE 0 (barrier, merge, apply on the held tile) where each row is one program, the
    only case a sequential interpreter can complete; the words reset themselves."""
    monkeypatch.setattr(onepass_plan, "TILE", 256)
    monkeypatch.setattr(onepass_plan, "TILE_BWD", 256)
    words = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    monkeypatch.setattr(onepass_launch, "_phases", lambda device: (0,))
    monkeypatch.setattr(onepass_launch, "_barrier_words", lambda device, rows: words)
    x, w, b, sc, sh, dy = _inputs((2, 8, 5, 7), torch.float32, True)
    p = onepass_plan.onepass_plan(2, 8, 35, 4, True, 4, plan.CPU_NUM_SMS, 1 << 20)
    assert p.split == 1 and p.rows == 4
    y = tg.forward(x, w, b, sc, sh, 4, EPS, "silu")[0]
    # Each row's word: sign bit flipped once, low bits back to 0; unused words untouched.
    assert words[:4].eq(-2**31).all() and words[4:].eq(0).all()
    out1 = _check(x, w, b, sc, sh, dy, 4, "silu")  # forward and backward: two more flips
    assert words[:4].eq(-2**31).all() and words[4:].eq(0).all()
    assert torch.equal(y, out1[0])
    monkeypatch.setattr(onepass_launch, "MODE", "pair")
    monkeypatch.setattr(onepass_launch, "_phases", lambda device: (1, 2))
    out2 = _check(x, w, b, sc, sh, dy, 4, "silu")
    assert all(torch.equal(a, b) for a, b in zip(out1, out2))  # PHASE 0 == the pair, bit for bit


def _split_path(monkeypatch, args, groups):
    with monkeypatch.context() as m:
        m.setattr(onepass_launch, "MODE", "off")
        y = tg.forward(*args[:5], groups, EPS, "silu")
        return y + tuple(tg.backward_grads(args[5], args[0], y[1], y[2], *args[1:5], groups, "silu", True))


@pytest.mark.skipif(DEVICE == "cuda", reason="CUDA has cooperative launches")
def test_falls_back_where_no_cooperative_launch(monkeypatch):
    """"auto" on a device without cooperative launches (the interpreter's CPU) is today's split path."""
    args = _inputs((2, 8, 5, 7), torch.float32, False)
    want = _split_path(monkeypatch, args, 4)
    monkeypatch.setattr(onepass_launch, "MODE", "auto")
    called = []
    monkeypatch.setattr(onepass_launch, "_run", lambda *a: called.append(a) or True)
    got = _check(*args, 4, "silu")
    assert not called
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_refused_launch_retries_with_fewer_programs_per_sm(monkeypatch):
    """Occupancy below RESIDENT_PER_SM: the plan one step down runs (here the barrier launch
    is stood in for by the pair, which the interpreter can run)."""
    grids = []

    def fits_one_per_sm(kernel, grid, args, kwargs):
        grids.append(grid[0])
        if grid[0] > plan.CPU_NUM_SMS:
            raise RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")
        for phase in (1, 2):
            kernel[grid](*args, **dict(kwargs, PHASE=phase))

    monkeypatch.setattr(onepass_launch, "_phases", lambda device: (0,))
    words = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    monkeypatch.setattr(onepass_launch, "_barrier_words", lambda device, rows: words)
    monkeypatch.setattr(onepass_launch, "launch_cooperative", fits_one_per_sm)
    x, w, b, sc, sh, dy = _inputs((2, 8, 5, 7), torch.float32, False)
    _check(x, w, b, sc, sh, dy, 4, "silu")
    assert grids == [8, 4, 8, 4]  # forward, backward: refused at 2 per SM, run at 1
    _check(x, w, b, sc, sh, dy, 4, "silu")
    assert grids[4:] == [4, 4]  # the refused plans are not tried again


def test_graph_capture_uses_only_plans_that_launched_before(monkeypatch):
    """Inside a CUDA-graph capture a refused launch could spoil the capture: an untried plan
    takes the split path there; after a launch outside the capture, the capture uses it."""
    launches = []

    def stand_in(kernel, grid, args, kwargs):  # the pair in place of the barrier launch
        launches.append(grid[0])
        for phase in (1, 2):
            kernel[grid](*args, **dict(kwargs, PHASE=phase))

    args = _inputs((2, 8, 5, 7), torch.float32, False)
    want = _split_path(monkeypatch, args, 4)
    monkeypatch.setattr(onepass_launch, "_phases", lambda device: (0,))
    words = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    monkeypatch.setattr(onepass_launch, "_barrier_words", lambda device, rows: words)
    monkeypatch.setattr(onepass_launch, "launch_cooperative", stand_in)
    with monkeypatch.context() as m:
        m.setattr(onepass_launch, "_capturing", lambda x: True)
        got = tg.forward(*args[:5], 4, EPS, "silu")
    assert not launches and all(torch.equal(a, b) for a, b in zip(got, want))
    outside = tg.forward(*args[:5], 4, EPS, "silu")
    assert len(launches) == 1
    with monkeypatch.context() as m:
        m.setattr(onepass_launch, "_capturing", lambda x: True)
        inside = tg.forward(*args[:5], 4, EPS, "silu")
    assert len(launches) == 2 and all(torch.equal(a, b) for a, b in zip(inside, outside))


def test_falls_back_when_the_cooperative_launch_is_refused(monkeypatch):
    args = _inputs((2, 8, 5, 7), torch.float32, False)
    want = _split_path(monkeypatch, args, 4)
    tries = []

    def refuse(*a):
        tries.append(a)
        raise RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")

    monkeypatch.setattr(onepass_launch, "_phases", lambda device: (0,))
    words = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    monkeypatch.setattr(onepass_launch, "_barrier_words", lambda device, rows: words)
    monkeypatch.setattr(onepass_launch, "launch_cooperative", refuse)
    got = _check(*args, 4, "silu")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    n_tries = len(tries)
    assert n_tries == 4  # forward and backward, each at 2 then 1 programs per SM...
    _check(*args, 4, "silu")
    assert len(tries) == n_tries  # ...and not again for the same plans

    def broken(*a):
        raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")

    monkeypatch.setattr(onepass_launch, "launch_cooperative", broken)
    onepass_launch._too_large.clear()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        tg.forward(*args[:5], 4, EPS, "silu")


# The plan on an H100-sized device (132 SMs, 50 MB L2) with the shipped knobs: pure Python.
KNOBS = ("TILE", "TILE_BWD", "RESIDENT_PER_SM", "SPAN_MIN_BYTES", "L2_SHARE", "FORCE_WIDE")
SHIPPED = {name: getattr(onepass_plan, name) for name in KNOBS}
LARGE_SHAPES = [(1, 512, 128, 128), (1, 512, 256, 256), (1, 128, 512, 512), (1, 256, 1024, 1024),
                (1, 128, 17 * 128 * 128), (8, 512, 64, 64), (2, 320, 96, 96), (1, 2, 2**30 + 4099)]


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_plan_on_a_large_device(monkeypatch, shape, channels_last, backward):
    for name, value in SHIPPED.items():
        monkeypatch.setattr(onepass_plan, name, value)
    n, c = shape[:2]
    hw = 1
    for d in shape[2:]:
        hw *= d
    g = 32 if c >= 32 else c
    sms, l2, eb = 132, 50 << 20, 2
    p = onepass_plan.onepass_plan(n, c, hw, g, channels_last, eb, sms, l2, backward)
    tile = onepass_plan.TILE_BWD if backward else onepass_plan.TILE
    assert p.grid <= sms * onepass_plan.RESIDENT_PER_SM          # all resident: the barrier is safe
    assert p.block_c * p.block_hw <= tile and p.block_c >= p.span_g * (c // g)
    span = p.k * p.block_hw
    assert p.split * span >= hw > (p.split - 1) * span           # every pixel, no empty program
    assert p.rows == n * g // p.span_g and g % p.span_g == 0
    assert p.rows_per_wave * p.waves >= p.rows > (p.waves - 1) * p.rows_per_wave
    span_bytes = p.span_g * (c // g) * eb
    assert not channels_last or span_bytes >= onepass_plan.SPAN_MIN_BYTES or p.span_g == g
    if p.k > 1:  # streamed: a wave's data fits the L2 share (or one row is all there is)
        row_bytes = span_bytes * hw * (2 if backward else 1)
        assert p.rows_per_wave == 1 or p.rows_per_wave * row_bytes <= onepass_plan.L2_SHARE * l2
    assert p.wide == (c * hw >= 2**31)


def test_groups_wider_than_a_tile_take_the_split_path():
    assert onepass_plan.onepass_plan(2, 512, 1, 2, False, 4, 4, 1 << 20) is None  # C/G = 256 > TILE
    x, w, b, sc, sh, dy = _inputs((2, 512, 1, 1), torch.float32, False)
    _check(x, w, b, sc, sh, dy, 2, "silu")


def test_plan_holds_mid_sizes_and_streams_the_largest(monkeypatch):
    for name, value in SHIPPED.items():
        monkeypatch.setattr(onepass_plan, name, value)
    assert onepass_plan.onepass_plan(1, 512, 128 * 128, 32, False, 2, 132, 50 << 20, False).k == 1
    big = onepass_plan.onepass_plan(1, 256, 1024 * 1024, 32, False, 2, 132, 50 << 20, False)
    assert big.k > 1 and big.rows_per_wave == 1  # a 16 MB group: one group per wave, in L2
    cl = onepass_plan.onepass_plan(1, 512, 128 * 128, 32, True, 2, 132, 50 << 20, False)
    assert cl.span_g * 16 * 2 >= 128 and cl.block_c == cl.span_g * 16


@pytest.mark.slow
@pytest.mark.skipif(DEVICE != "cuda", reason="needs 2^31 elements on a GPU")
def test_channels_last_past_int32_indexing():
    """bfloat16 channels-last (1, 32, 1, 2^26 + 256): 2^31 + 8192 elements, both groups of
    16 channels run to the last element (int64 offsets within a sample), forward and backward
    through the public op. tests/test_large.py does the same for NCHW."""
    import groupnorm

    w_ = 2**26 + 256
    x = torch.empty((1, 32, 1, w_), dtype=torch.bfloat16, device="cuda", memory_format=torch.channels_last)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for g in range(2):
        x[:, 16 * g:16 * g + 16] = (3.0 * g - 1.0 + (0.5 + g) * torch.randn(
            (1, 16, 1, w_), device="cuda", generator=gen)).bfloat16()
    assert x.numel() > 2**31
    weight = torch.tensor([1.5] * 16 + [-0.5] * 16, device="cuda")
    bias = torch.tensor([0.25] * 16 + [2.0] * 16, device="cuda")
    y = groupnorm.group_norm(x, 2, weight, bias)
    step = 1 << 24
    for g in range(2):
        part = x[0, 16 * g:16 * g + 16]
        mean = sum(part[..., i:i + step].double().sum().item() for i in range(0, w_, step)) / part.numel()
        var = sum((part[..., i:i + step].double() - mean).square().sum().item()
                  for i in range(0, w_, step)) / part.numel()
        rstd = (var + EPS) ** -0.5
        for ch, idx in ((16 * g, 0), (16 * g + 7, w_ // 2), (16 * g + 15, w_ - 1), (16 * g + 3, w_ - 4097)):
            want = (x[0, ch, 0, idx].double().item() - mean) * rstd * weight[ch].item() + bias[ch].item()
            assert abs(y[0, ch, 0, idx].double().item() - want) <= 2e-2 * (1 + abs(want)), (g, ch, idx)
    del y
    xr = x.requires_grad_(True)
    wr, br = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    dx, dw, db = torch.autograd.grad(groupnorm.group_norm(xr, 2, wr, br), (xr, wr, br), torch.ones_like(x))
    # dy = 1: dbias = pixels per channel; dx ~ 0 up to the last element (a wrapped offset: garbage).
    torch.testing.assert_close(db, torch.full((32,), float(w_), device="cuda"), rtol=1e-4, atol=0)
    assert torch.isfinite(dx[0, :, 0, -4096:]).all() and dx[0, :, 0, -4096:].abs().max().item() < 1e-2


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_sample_has_the_same_bits_alone_and_in_a_batch(channels_last):
    """The one-pass plan groups a sample's tiles into partials by the sample's shape only
    (not N): forward y and dx of sample 1 alone equal its rows inside a batch of three."""
    for n in (1, 3, 16):
        a = onepass_plan.onepass_plan(n, 8, 9 * 11, 4, channels_last, 4, plan.CPU_NUM_SMS, 1 << 20)
        b = onepass_plan.onepass_plan(1, 8, 9 * 11, 4, channels_last, 4, plan.CPU_NUM_SMS, 1 << 20)
        assert (a.k, a.split, a.span_g) == (b.k, b.split, b.span_g)
    x, w, b, sc, sh, dy = _inputs((3, 8, 9, 11), torch.float32, channels_last)
    batch = tg.forward(x, w, b, sc, sh, 4, EPS, "silu")
    alone = tg.forward(x[1:2], w, b, sc[1:2], sh[1:2], 4, EPS, "silu")
    assert torch.equal(batch[0][1:2], alone[0])
    dx_batch = tg.backward_grads(dy, x, batch[1], batch[2], w, b, sc, sh, 4, "silu", True)[0]
    dx_alone = tg.backward_grads(dy[1:2], x[1:2], alone[1], alone[2], w, b, sc[1:2], sh[1:2], 4, "silu", True)[0]
    assert torch.equal(dx_batch[1:2], dx_alone)
