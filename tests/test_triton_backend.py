"""Triton backend vs the reference: every contract function, layout, dtype, path and epilogue.

Without CUDA the kernels run on CPU tensors through the Triton interpreter (slow: tiny
shapes). The split paths are forced on tiny shapes by monkeypatching ``plan``'s constants.
Outputs are allocated NaN-filled, so an element no kernel writes fails the comparison.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from groupnorm import reference  # noqa: E402
from groupnorm.backends.triton_gpu import launch, plan  # noqa: E402
import groupnorm.backends.triton_gpu as tg  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ACTIVATIONS = ["none", "silu", "gelu", "gelu_tanh", "relu", "mish"]
# (shape, num_groups): 4-D, 5-D, 2-D (HW = 1), one channel per group, one group, 3-D.
SHAPES = [((2, 6, 5, 7), 3), ((1, 4, 3, 4, 5), 2), ((3, 10), 5), ((2, 6, 3, 5), 6), ((2, 4, 3, 3), 1),
          ((2, 6, 7), 2)]
# Relative tolerance by dtype (the output is rounded to the dtype once).
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
EPS = 1e-5


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output the launchers allocate starts as NaN."""
    def empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    def empty_like(x):
        return torch.empty_like(x).fill_(float("nan"))

    monkeypatch.setattr(launch, "empty", empty)
    monkeypatch.setattr(launch, "empty_like", empty_like)


def _set_path(monkeypatch, path):
    if path == "fused":  # one program per group, group in registers (defaults)
        return
    monkeypatch.setattr(plan, "FUSED_MAX_GROUP", 0)
    if path == "group":  # one program per group, looping over it twice in small steps
        monkeypatch.setattr(plan, "GROUP_BLOCK", 16)
        monkeypatch.setattr(plan, "BACKWARD_TILE", 16)
        return
    monkeypatch.setattr(plan, "GROUP_MAX_GROUP", 0)
    monkeypatch.setattr(plan, "LOOP_BLOCK", 32)
    monkeypatch.setattr(plan, "REDUCE_TILE", 32)
    if path == "split":  # one program per group, looping over blocks
        monkeypatch.setattr(plan, "SPLIT_MIN_CHUNK", 1 << 30)
    else:  # "split_stats": each group split across many programs (small N * G)
        monkeypatch.setattr(plan, "SPLIT_MIN_CHUNK", 32)
        monkeypatch.setattr(plan, "CPU_NUM_SMS", 64)


PATHS = ["fused", "group", "split", "split_stats"]


def _layout(x, channels_last):
    return x.movedim(1, -1).contiguous().movedim(-1, 1) if channels_last else x.contiguous()


def _inputs(shape, num_groups, dtype, channels_last, seed=0, affine=True, scale_shift=True,
            scale_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = (-2.3 + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    x = _layout(x, channels_last).to(DEVICE)
    c, n = shape[1], shape[0]
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = (1.0 + 0.3 * torch.randn(c, generator=g)).to(pdt).to(DEVICE) if affine else None
    b = (0.2 * torch.randn(c, generator=g)).to(pdt).to(DEVICE) if affine else None
    sdt = scale_dtype or pdt
    sc = (0.3 * torch.randn(n, c, generator=g)).to(sdt).to(DEVICE) if scale_shift else None
    sh = (0.3 * torch.randn(n, c, generator=g)).to(sdt).to(DEVICE) if scale_shift else None
    dy = _layout(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), channels_last).to(DEVICE)
    return x, w, b, sc, sh, dy


def _d(t):
    return None if t is None else t.double().cpu()


def _close(ours, ref, dtype, what):
    assert ours.device.type == torch.device(DEVICE).type, what
    ours = ours.double().cpu()
    assert not torch.isnan(ours).any(), f"{what}: unwritten (NaN) elements"
    rtol = RTOL[dtype]
    atol = rtol * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _check_contract(x, w, b, sc, sh, dy, num_groups, activation):
    """All five contract functions against the reference run on float64 copies."""
    dtype = x.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    xd, wd, bd, scd, shd, dyd = map(_d, (x, w, b, sc, sh, dy))

    y, mean, rstd = tg.forward(x, w, b, sc, sh, num_groups, EPS, activation)
    y_r, mean_r, rstd_r = reference.forward(xd, wd, bd, scd, shd, num_groups, EPS, activation)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    assert mean.dtype == acc and rstd.dtype == acc and mean.shape == (x.shape[0], num_groups)
    _close(y, y_r, dtype, "forward y")
    stat_rtol = 1e-12 if dtype == torch.float64 else 1e-5
    _close(mean, mean_r, torch.float64 if dtype == torch.float64 else torch.float32, "mean")
    torch.testing.assert_close(rstd.double().cpu(), rstd_r, rtol=stat_rtol * 10, atol=0)

    mean2, m2 = tg.stats(x, num_groups)
    _, m2_r = reference.stats(xd, num_groups)
    assert mean2.dtype == acc and m2.dtype == acc
    _close(mean2, mean_r, torch.float64 if dtype == torch.float64 else torch.float32, "stats mean")
    torch.testing.assert_close(m2.double().cpu(), m2_r, rtol=stat_rtol * 10, atol=stat_rtol)

    # apply / backward with the reference's statistics, so each is checked on its own.
    mean_in, rstd_in = mean_r.to(acc).to(DEVICE), rstd_r.to(acc).to(DEVICE)
    y2 = tg.apply(x, mean_in, rstd_in, w, b, sc, sh, num_groups, activation)
    assert y2.stride() == x.stride()
    _close(y2, reference.apply(xd, mean_r, rstd_r, wd, bd, scd, shd, num_groups, activation), dtype, "apply")

    s1, s0 = tg.backward_reduce(dy, x, mean_in, rstd_in, w, b, sc, sh, num_groups, activation)
    s1_r, s0_r = reference.backward_reduce(dyd, xd, mean_r, rstd_r, wd, bd, scd, shd, num_groups, activation)
    assert s1.dtype == acc and s1.shape == (x.shape[0], x.shape[1])
    sum_rtol = 1e-10 if dtype == torch.float64 else 1e-4
    for ours, ref, name in ((s1, s1_r, "sum_dz_xhat"), (s0, s0_r, "sum_dz")):
        ours = ours.double().cpu()
        assert not torch.isnan(ours).any(), name
        torch.testing.assert_close(ours, ref, rtol=sum_rtol, atol=sum_rtol * max(1.0, ref.abs().max().item()))

    n, g = x.shape[0], num_groups
    gen = torch.Generator().manual_seed(1)
    sdx = torch.randn(n, g, generator=gen, dtype=torch.float64)
    sdxx = torch.randn(n, g, generator=gen, dtype=torch.float64)
    count = x.numel() // (n * g)
    dx = tg.backward_dx(dy, x, mean_in, rstd_in, w, b, sc, sh, sdx.to(acc).to(DEVICE),
                        sdxx.to(acc).to(DEVICE), count, num_groups, activation)
    dx_r = reference.backward_dx(dyd, xd, mean_r, rstd_r, wd, bd, scd, shd, sdx.to(acc).double(),
                                 sdxx.to(acc).double(), count, num_groups, activation)
    assert dx.dtype == dtype and dx.stride() == x.stride()
    _close(dx, dx_r, dtype, "backward_dx")
    _check_backward_grads(x, w, b, sc, sh, dy, mean_in, rstd_in, num_groups, activation)
    return y


def _check_backward_grads(x, w, b, sc, sh, dy, mean, rstd, num_groups, activation):
    """backward_grads (one or two launches) against the reference stages + grad_terms in float64."""
    from groupnorm import grad_terms

    xd, wd, bd, scd, shd, dyd = map(_d, (x, w, b, sc, sh, dy))
    md, rd = mean.double().cpu(), rstd.double().cpu()
    a, bsum = reference.backward_reduce(dyd, xd, md, rd, wd, bd, scd, shd, num_groups, activation)
    sdx, sdxx = grad_terms.group_sums(a, bsum, wd, scd, num_groups)
    dx_r = reference.backward_dx(dyd, xd, md, rd, wd, bd, scd, shd, sdx, sdxx,
                                 x.numel() // (x.shape[0] * num_groups), num_groups, activation)
    want = (dx_r,) + tuple(grad_terms.param_grads(a, bsum, wd, bd, scd, shd))
    got = tg.backward_grads(dy, x, mean, rstd, w, b, sc, sh, num_groups, activation, True)
    names = ("dx", "dweight", "dbias", "dscale", "dshift")
    for ours, ref, param, name in zip(got, want, (x, w, b, sc, sh), names):
        if param is None:
            assert ours is None, name
            continue
        assert ours.dtype == param.dtype and ours.shape == param.shape, name
        # Parameter gradients are sums over N * HW terms rounded once to the parameter dtype.
        _close(ours, ref, param.dtype if name != "dx" else x.dtype, f"backward_grads {name}")
    assert got[0].stride() == x.stride()
    assert tg.backward_grads(dy, x, mean, rstd, w, b, sc, sh, num_groups, activation, False)[0] is None


def _contract_cases():
    # Every dtype on every path; layouts and shapes rotate so each meets each path too.
    layouts = [(shape, g, cl) for shape, g in SHAPES for cl in (False, True) if not (cl and len(shape) == 2)]
    cases = []
    for i, (dtype, path) in enumerate((d, p) for d in DTYPES for p in PATHS):
        shape, g, cl = layouts[i % len(layouts)]
        cases.append(pytest.param(shape, g, cl, dtype, path,
                                  id=f"{path}-{str(dtype)[6:]}-{'cl' if cl else 'nchw'}-{len(shape)}d"))
    return cases


@pytest.mark.parametrize("shape,num_groups,channels_last,dtype,path", _contract_cases())
def test_contract(monkeypatch, shape, num_groups, channels_last, dtype, path):
    _set_path(monkeypatch, path)
    x, w, b, sc, sh, dy = _inputs(shape, num_groups, dtype, channels_last)
    _check_contract(x, w, b, sc, sh, dy, num_groups, "silu")
    # The plain op against torch itself.
    y, _, _ = tg.forward(x, w, b, None, None, num_groups, EPS, "none")
    ref = F.group_norm(x.double(), num_groups, w.double(), b.double(), EPS)
    _close(y, ref.cpu(), dtype, "vs F.group_norm")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_epilogue(monkeypatch, activation, path):
    _set_path(monkeypatch, path)
    channels_last = ACTIVATIONS.index(activation) % 2 == 1
    x, w, b, sc, sh, dy = _inputs((2, 6, 5, 7), 3, torch.float32, channels_last)
    _check_contract(x, w, b, sc, sh, dy, 3, activation)


@pytest.mark.parametrize("path", PATHS)
def test_flag_combinations(monkeypatch, path):
    """Each of HAS_WEIGHT / HAS_BIAS / HAS_SCALE / HAS_SHIFT on its own, and none."""
    _set_path(monkeypatch, path)
    x, w, b, sc, sh, dy = _inputs((2, 6, 5, 7), 3, torch.float32, path in ("split", "group"))
    act = {"fused": "gelu_tanh", "group": "silu", "split": "mish", "split_stats": "relu"}[path]
    for keep in ("w", "b", "sc", "sh", ""):
        args = [t if name == keep else None for t, name in zip((w, b, sc, sh), ("w", "b", "sc", "sh"))]
        _check_contract(x, *args, dy, 3, act if keep else "none")


@pytest.mark.parametrize("x_dtype,scale_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16),
                                                 (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float32)],
                         ids=str)
def test_mixed_param_dtypes(monkeypatch, x_dtype, scale_dtype):
    _set_path(monkeypatch, "split_stats")
    x, w, b, sc, sh, dy = _inputs((2, 6, 5, 7), 3, x_dtype, True, scale_dtype=scale_dtype)
    _check_contract(x, w, b, sc, sh, dy, 3, "gelu")


def test_dy_in_other_memory_format():
    x, w, b, sc, sh, dy = _inputs((2, 6, 5, 7), 3, torch.float32, True)
    y, mean, rstd = tg.forward(x, w, b, sc, sh, 3, EPS, "mish")
    dy_nchw = dy.contiguous()
    s_cl = tg.backward_reduce(dy, x, mean, rstd, w, b, sc, sh, 3, "mish")
    s_nc = tg.backward_reduce(dy_nchw, x, mean, rstd, w, b, sc, sh, 3, "mish")
    for a, c in zip(s_cl, s_nc):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("activation,channels_last", [("none", False), ("gelu", True), ("mish", False)])
def test_gradient_end_to_end(monkeypatch, channels_last, activation):
    """backward_reduce -> group sums -> backward_dx equals autograd of the float64 layer."""
    _set_path(monkeypatch, "split_stats")
    shape, g = (2, 6, 5, 7), 3
    x, w, b, sc, sh, dy = _inputs(shape, g, torch.float64, channels_last)
    y, mean, rstd = tg.forward(x, w, b, sc, sh, g, EPS, activation)
    s1, s0 = tg.backward_reduce(dy, x, mean, rstd, w, b, sc, sh, g, activation)
    factor = (1.0 + sc) * w  # (N, C): dxhat = dz1 * factor
    n, c = shape[:2]
    sum_dxhat = (factor * s0).reshape(n, g, -1).sum(-1)
    sum_dxhat_xhat = (factor * s1).reshape(n, g, -1).sum(-1)
    count = x.numel() // (n * g)
    dx = tg.backward_dx(dy, x, mean, rstd, w, b, sc, sh, sum_dxhat, sum_dxhat_xhat, count, g, activation)

    leaves = [t.detach().cpu().clone().requires_grad_(True) for t in (x, w, b, sc, sh)]
    out = reference.differentiable_group_norm(*leaves, g, EPS, activation)
    out.backward(dy.cpu())
    torch.testing.assert_close(dx.cpu(), leaves[0].grad, rtol=1e-9, atol=1e-9)
    # dweight, dbias, dscale, dshift from the per-(n, c) sums.
    torch.testing.assert_close((s1 * (1.0 + sc)).sum(0).cpu(), leaves[1].grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close((s0 * (1.0 + sc)).sum(0).cpu(), leaves[2].grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s0.cpu(), leaves[4].grad, rtol=1e-9, atol=1e-9)


def test_default_plan_of_a_group_above_registers():
    """With the default constants a group above FUSED_MAX_GROUP takes the "group" path
    (one full GROUP_BLOCK step and a partial one here), one above GROUP_MAX_GROUP the split
    path over several programs."""
    shape, g = (1, 2, 64, 72), 1  # group of 9216 elements
    assert not plan.use_fused(2 * 64 * 72)
    sms = launch.num_sms(torch.device(DEVICE))
    assert plan.forward_plan(plan.Shape(1, 2, 64 * 72, 1, False), sms).path == "group"
    big = plan.forward_plan(plan.Shape(1, 2, plan.GROUP_MAX_GROUP, 1, False), sms)
    assert big.path == "split" and big.split.split > 1
    x, w, b, sc, sh, dy = _inputs(shape, g, torch.float32, False)
    _check_contract(x, w, b, sc, sh, dy, g, "silu")


@pytest.mark.parametrize("path,channels_last", [("fused", False), ("split_stats", False), ("split_stats", True)])
def test_deterministic(monkeypatch, path, channels_last):
    _set_path(monkeypatch, path)
    x, w, b, sc, sh, dy = _inputs((2, 8, 9, 11), 4, torch.float32, channels_last, seed=3)
    runs = []
    for _ in range(2):
        y, mean, rstd = tg.forward(x, w, b, sc, sh, 4, EPS, "silu")
        s1, s0 = tg.backward_reduce(dy, x, mean, rstd, w, b, sc, sh, 4, "silu")
        dx = tg.backward_dx(dy, x, mean, rstd, w, b, sc, sh, s0[:, :4], s1[:, :4], 198, 4, "silu")
        runs.append([y, mean, rstd, s1, s0, dx, *tg.stats(x, 4)])
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("path,channels_last", [("fused", False), ("split", True), ("split_stats", False),
                                                 ("split_stats", True)])
def test_large_mean_stability(monkeypatch, path, channels_last):
    _set_path(monkeypatch, path)
    g = torch.Generator().manual_seed(5)
    x = (1e4 + 1e-2 * torch.randn(2, 8, 9, 11, generator=g)).to(DEVICE)
    x = _layout(x, channels_last)
    y, mean, rstd = tg.forward(x, None, None, None, None, 4, 1e-12, "none")
    std = y.double().reshape(2, 4, -1).std(dim=-1, unbiased=False)
    assert (std - 1.0).abs().max().item() < 1e-3
    _, m2 = tg.stats(x, 4)
    _, m2_r = reference.stats(x.double().cpu(), 4)
    torch.testing.assert_close(m2.double().cpu(), m2_r, rtol=1e-3, atol=0)


def test_plan_fills_gpu_for_small_batch():
    """Batch 1 with 32 groups on 132 SMs: the split plan launches >= one program per SM."""
    for hw in (64 * 64, 128 * 128, 512 * 512):
        p = plan.split_plan(10 * hw, 32, 132)
        assert 32 * p.split >= 132
        assert p.chunk % p.block == 0 and (p.split - 1) * p.chunk < 10 * hw <= p.split * p.chunk
    r = plan.reduce_plan(1, 320, 64 * 64, True, 132)
    assert triton_cdiv(320, r.block_c) * r.split >= 132
    assert plan.use_fused(40 * 64) and not plan.use_fused(10 * 64 * 64)


def triton_cdiv(a, b):
    return -(-a // b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("path", PATHS)
def test_cuda_graph_capture(monkeypatch, path):
    """No host synchronisation inside the ops: forward + backward capture and replay."""
    _set_path(monkeypatch, path)
    x, w, b, sc, sh, dy = _inputs((2, 64, 16, 16), 8, torch.float16, True)
    g, count = 8, 8 * 256

    def step():
        y, mean, rstd = tg.forward(x, w, b, sc, sh, g, EPS, "silu")
        s1, s0 = tg.backward_reduce(dy, x, mean, rstd, w, b, sc, sh, g, "silu")
        dx = tg.backward_dx(dy, x, mean, rstd, w, b, sc, sh, s0[:, :g].contiguous(),
                            s1[:, :g].contiguous(), count, g, "silu")
        return y, s1, s0, dx

    eager = step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, c in zip(eager, captured):
        assert torch.equal(a, c)


def test_plan_arithmetic_matches_triton():
    """plan.cdiv / next_power_of_2 are plain Python (triton's are JIT functions, slow on
    the host) and must agree with triton's for every size a plan meets."""
    import triton

    for n in list(range(0, 70)) + [1023, 1024, 1025, 2 ** 20 + 3, 2 ** 31 + 5]:
        assert plan.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 32, 1024):
            assert plan.cdiv(n, d) == triton.cdiv(n, d), (n, d)


def test_split_plan_programs_per_sm_by_layout():
    """NCHW split passes aim at WAVES_PER_SM_NCHW programs per SM, channels-last at
    WAVES_PER_SM (see plan.py for the H100 measurement behind the split)."""
    size = 10 * 512 * 512
    nchw = plan.split_plan(size, 32, 132)
    cl = plan.split_plan(size, 32, 132, channels_last=True)
    assert 32 * nchw.split >= 132 * plan.WAVES_PER_SM_NCHW
    assert 132 * plan.WAVES_PER_SM <= 32 * cl.split < 32 * nchw.split


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_group_path_channels_last_every_dtype(monkeypatch, dtype):
    """The one-program-per-group kernels (forward and backward) on channels-last input in
    every dtype, with every epilogue piece (the contract cases reach channels-last on
    this path in float32 only)."""
    _set_path(monkeypatch, "group")
    x, w, b, sc, sh, dy = _inputs((2, 6, 5, 7), 3, dtype, True, seed=7)
    _check_contract(x, w, b, sc, sh, dy, 3, "gelu_tanh")


@pytest.mark.parametrize("channels_last", [False, True])
def test_split_paths_are_batch_and_device_invariant(monkeypatch, channels_last):
    """A sample's y and dx have the same bits alone and inside a batch, and on devices of
    another SM count: the split plans size their partials for one sample on a reference
    device (plan.REFERENCE_SMS), so N and the SM count never change a reduction order."""
    from groupnorm.backends.triton_gpu import onepass_launch

    _set_path(monkeypatch, "split_stats")
    monkeypatch.setattr(onepass_launch, "MODE", "off")
    for n in (1, 8):
        for sms in (4, 64, 132):
            assert plan.split_plan(4096, 4, sms).split == plan.split_plan(4096, 4, 132).split
            assert plan.reduce_plan(n, 8, 4096, channels_last, sms) == plan.reduce_plan(1, 8, 4096,
                                                                                        channels_last, 132)
    x, w, b, s, h, dy = _inputs((3, 8, 9, 11), 4, torch.float32, channels_last)
    outs = {}
    for sms in (4, 64):
        monkeypatch.setattr(plan, "CPU_NUM_SMS", sms)
        batch = tg.forward(x, w, b, s, h, 4, EPS, "silu")
        alone = tg.forward(x[1:2], w, b, s[1:2], h[1:2], 4, EPS, "silu")
        assert torch.equal(batch[0][1:2], alone[0])
        dx_batch = tg.backward_grads(dy, x, batch[1], batch[2], w, b, s, h, 4, "silu", True)[0]
        dx_alone = tg.backward_grads(dy[1:2], x[1:2], alone[1], alone[2], w, b, s[1:2], h[1:2], 4, "silu",
                                     True)[0]
        assert torch.equal(dx_batch[1:2], dx_alone)
        outs[sms] = (batch[0], dx_batch)
    assert all(torch.equal(a, b) for a, b in zip(outs[4], outs[64]))
