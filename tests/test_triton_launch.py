"""The Triton launcher and plans: the direct launch's cache key, launch counts, the plan of
every GPU suite shape on a 132-SM device.

The key logic is plain Python and is checked on CPU tensors against Triton's own
specialisation (``native_specialize_impl``, what ``JITFunction.run`` keys on). Launch
counts run the kernels through the interpreter on tiny shapes whose plans take the same
paths as the UNet shapes. The direct launch itself needs a GPU (skipped here).
"""
import itertools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest

pytest.importorskip("triton")

from groupnorm import reference  # noqa: E402
from groupnorm.backends.triton_gpu import direct, launch, plan  # noqa: E402
from groupnorm.bench.suite import GPU_SUITE  # noqa: E402
import groupnorm.backends.triton_gpu as tg  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output the launchers allocate starts as NaN (an unwritten element shows)."""
    monkeypatch.setattr(launch, "empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                  device=device))
    monkeypatch.setattr(launch, "empty_like", lambda x: torch.empty_like(x).fill_(float("nan")))


def _native():
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        pytest.skip("this Triton has no native_specialize_impl")
    return lambda a: native_specialize_impl(BaseBackend, a, False, True, True)


def _argument_variants():
    """Values one argument slot may take: tensors of several dtypes and alignments, ints
    on every side of Triton's rules (1, multiples of 16, the int32 range), floats."""
    base = torch.empty(64, dtype=torch.float16)
    f32 = torch.empty(64, dtype=torch.float32)
    tensors = [base, base[1:], base[8:], torch.empty(8, dtype=torch.bfloat16), f32, f32[1:], f32[4:],
               torch.empty(8, dtype=torch.float64)]
    ints = [0, 1, 2, 15, 16, 17, 32, -16, -17, 2 ** 31 - 16, 2 ** 31, 2 ** 31 + 1, -(2 ** 31), -(2 ** 31) - 16]
    return tensors, ints, [1e-5, 0.0, 1.0]


def test_key_facts_match_triton_specialisation():
    """Two values of an argument get the same fact exactly when Triton specialises them
    alike: a fact too coarse would launch a kernel compiled for other facts."""
    native = _native()
    tensors, ints, floats = _argument_variants()
    for group in (tensors, ints, floats):
        for a, b in itertools.combinations(group, 2):
            ours = direct.specialisation([a]) == direct.specialisation([b])
            theirs = native(a) == native(b)
            assert ours == theirs, (a if not isinstance(a, torch.Tensor) else (a.dtype, a.data_ptr() % 16),
                                    b if not isinstance(b, torch.Tensor) else (b.dtype, b.data_ptr() % 16))
    # An int and a float in the same place never share a key (Triton: i32 vs fp32).
    assert direct.specialisation([16]) != direct.specialisation([16.0])


def test_key_changes_with_each_fact():
    """The launcher's key (param_sums_kernel: four pointers, then N, C) is finer than
    Triton's facts: every fact that changes a compilation changes it."""
    x = torch.empty(64, dtype=torch.float32)
    k = launch.PARAM_SUMS.key
    flags = (True, True, "acc", 256)

    def args(t, n=16):
        return (x, x, t, t, n, 320)

    same = k(args(x), flags, 4, 0)
    assert same == k(args(x), flags, 4, 0)
    assert same == k(args(torch.empty(64, dtype=torch.float32)[4:]), flags, 4, 0)   # 16-byte aligned too
    assert same != k(args(x[1:]), flags, 4, 0)                                     # unaligned view
    assert same != k(args(x.half()), flags, 4, 0)                                  # another dtype
    assert same != k(args(x), (False, True, "acc", 256), 4, 0)                     # another flag
    assert same != k(args(x, 17), flags, 4, 0)                                     # divisibility
    assert same != k(args(x, 1), flags, 4, 0)                                      # 1 compiles in
    assert same != k(args(x, 2 ** 31), flags, 4, 0)                                # int64
    assert same != k(args(x), flags, 8, 0)                                         # num_warps
    assert same != k(args(x), flags, 4, 1)                                         # device


def test_key_is_finer_than_triton_facts():
    """Whenever two launches share a key, Triton specialises their arguments alike."""
    native = _native()
    tensors, ints, _ = _argument_variants()
    k = launch.PARAM_SUMS.key
    cases = [(a, b, n) for a in tensors for b in tensors[:3] for n in ints]
    keys = {}
    for a, b, n in cases:
        facts = tuple(native(v) for v in (a, a, b, b, n, 320))
        keys.setdefault(k((a, a, b, b, n, 320), (True,), 4, 0), set()).add(facts)
    assert all(len(f) == 1 for f in keys.values())


def test_launchers_know_their_pointer_parameters():
    for launcher in launch.LAUNCHERS:
        names = launcher.kernel.arg_names
        assert launcher.n_ptr >= 2 and all(n.endswith("_ptr") for n in names[:launcher.n_ptr])
        assert not any(n.endswith("_ptr") for n in names[launcher.n_ptr:])


def test_launcher_requires_trailing_constexprs():
    with pytest.raises(ValueError):
        direct.Launcher(launch.FUSED.kernel, ("CPG",))


def test_version_range():
    assert direct.version_supported("3.6.0") and direct.version_supported("3.9.0")
    assert direct.version_supported("3.7.1+git1234")
    assert not direct.version_supported("3.5.1") and not direct.version_supported("4.0.0")
    assert not direct.version_supported("nonsense")


def test_interpreter_and_cpu_tensors_take_the_fallback():
    x = torch.randn(2, 8, 4, 4).to(DEVICE)
    before = [(k.direct_launches, k.fallback_launches) for k in launch.LAUNCHERS]
    tg.forward(x, None, None, None, None, 4, 1e-5, "none")
    after = [(k.direct_launches, k.fallback_launches) for k in launch.LAUNCHERS]
    if DEVICE == "cpu":
        assert all(a[0] == b[0] for a, b in zip(after, before))
        assert sum(a[1] - b[1] for a, b in zip(after, before)) == 1


# --- launch counts -----------------------------------------------------------------------

def _count(fn):
    before = launch.launch_count()
    out = fn()
    return launch.launch_count() - before, out


def _inputs(shape, g, dtype=torch.float32, channels_last=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (0.5 + torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if channels_last:
        x, dy = (t.movedim(1, -1).contiguous().movedim(-1, 1) for t in (x, dy))
    c = shape[1]
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = (1 + 0.3 * torch.randn(c, generator=gen)).to(pdt)
    b = (0.2 * torch.randn(c, generator=gen)).to(pdt)
    return x.to(DEVICE), dy.to(DEVICE), w.to(DEVICE), b.to(DEVICE)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("fused", [True, False], ids=["registers", "group"])
def test_unet_like_plans_launch_once_forward_twice_backward(monkeypatch, fused, channels_last):
    """A group that fits one program: forward 1 launch, backward 2 (1 without weight/bias)."""
    if not fused:
        monkeypatch.setattr(plan, "FUSED_MAX_GROUP", 0)
        monkeypatch.setattr(plan, "GROUP_BLOCK", 32)
        monkeypatch.setattr(plan, "BACKWARD_TILE", 32)
    x, dy, w, b = _inputs((2, 8, 5, 6), 4, channels_last=channels_last)
    lay = launch.Layout(x, 4)
    assert launch.forward_plan(lay).path == ("fused" if fused else "group")
    n, (y, mean, rstd) = _count(lambda: tg.forward(x, w, b, None, None, 4, 1e-5, "silu"))
    assert n == 1
    n, _ = _count(lambda: tg.forward_output(x, w, b, None, None, 4, 1e-5, "silu"))
    assert n == 1
    n, grads = _count(lambda: tg.backward_grads(dy, x, mean, rstd, w, b, None, None, 4, "silu", True))
    assert n == 2 and all(g is not None for g in grads[:3])
    n, grads = _count(lambda: tg.backward_grads(dy, x, mean, rstd, None, None, None, None, 4, "silu", True))
    assert n == 1 and grads[0] is not None


def test_large_groups_keep_the_split_path(monkeypatch):
    """Forward two launches (partial statistics, apply), backward two (tile partials,
    their merge with dx)."""
    monkeypatch.setattr(plan, "FUSED_MAX_GROUP", 0)
    monkeypatch.setattr(plan, "GROUP_MAX_GROUP", 0)
    monkeypatch.setattr(plan, "LOOP_BLOCK", 32)
    monkeypatch.setattr(plan, "REDUCE_TILE", 32)
    x, dy, w, b = _inputs((2, 8, 5, 6), 4)
    n, (y, mean, rstd) = _count(lambda: tg.forward(x, w, b, None, None, 4, 1e-5, "none"))
    assert n == 2
    n, grads = _count(lambda: tg.backward_grads(dy, x, mean, rstd, w, b, None, None, 4, "none", True))
    assert n == 2 and all(g is not None for g in grads[:3])


# --- plans of the GPU suite on a 132-SM device ----------------------------------------

def _shape(case, n=None, channels_last=False):
    shape = case.shape
    hw = 1
    for d in shape[2:]:
        hw *= d
    return plan.Shape(n or shape[0], shape[1], hw, case.num_groups, channels_last)


UNET = [c for c in GPU_SUITE if "unet" in c.name]
LARGE = [c for c in GPU_SUITE if "unet" not in c.name]


def test_suite_has_both_kinds():
    assert len(UNET) == 5 and len(LARGE) == 4


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", UNET, ids=lambda c: c.name)
def test_unet_suite_plans_are_one_launch_at_batch_1_to_8(case, channels_last):
    for n in range(1, 9):
        s = _shape(case, n, channels_last)
        f = plan.forward_plan(s, 132)
        assert f.launches == 1 and f.grid == (n * 32,), (n, f)
        assert f.path == ("fused" if s.group_size <= plan.FUSED_MAX_GROUP else "group")
        assert f.block <= plan.GROUP_BLOCK and f.block & (f.block - 1) == 0
        bwd = plan.backward_plan(s, 132, True)
        assert bwd.path == "group" and bwd.launches == 2 and bwd.grid == (n * 32,)
        assert bwd.block_cpg >= s.cpg and bwd.block_cpg * bwd.block_hw <= plan.BACKWARD_TILE
        assert plan.backward_plan(s, 132, False).launches == 1


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", LARGE, ids=lambda c: c.name)
def test_large_suite_plans_split_over_the_gpu(case, channels_last):
    """VAE / video groups: two forward launches whose grid fills the 132 SMs."""
    s = _shape(case, channels_last=channels_last)
    f = plan.forward_plan(s, 132)
    assert f.path == "split" and f.launches == 2
    rows, split = f.grid
    assert rows == s.rows and split == f.split.split and rows * split >= 132
    assert (split - 1) * f.split.chunk < s.group_size <= split * f.split.chunk
    bwd = plan.backward_plan(s, 132, True)
    assert bwd.path == "split" and bwd.launches == 2
    assert bwd.grid[0] * bwd.grid[1] * bwd.grid[2] >= 132


def test_unet_suite_plans_exact():
    """The exact plans of the suite's UNet shapes (NCHW), so a change of knob shows."""
    want = {
        "sd15-unet b1 320x64x64": ("group", (32,), 8192, 16),
        "sd15-unet b8 320x64x64": ("group", (256,), 8192, 16),
        "sd15-unet b8 1280x8x8": ("fused", (256,), 4096, 8),
        "sdxl-unet b1 640x64x64": ("group", (32,), 8192, 16),
        "sdxl-unet b8 1280x32x32": ("group", (256,), 8192, 16),
    }
    for case in UNET:
        f = plan.forward_plan(_shape(case), 132)
        assert (f.path, f.grid, f.block, f.num_warps) == want[case.name], case.name


# --- the group kernels: bitwise repeat, statistics skipped, partial gradients -----------

@pytest.mark.parametrize("channels_last", [False, True])
def test_group_path_bitwise_repeat(monkeypatch, channels_last):
    monkeypatch.setattr(plan, "FUSED_MAX_GROUP", 0)
    monkeypatch.setattr(plan, "GROUP_BLOCK", 16)
    monkeypatch.setattr(plan, "BACKWARD_TILE", 16)
    x, dy, w, b = _inputs((3, 6, 5, 7), 3, channels_last=channels_last, seed=4)
    runs = []
    for _ in range(2):
        y, mean, rstd = tg.forward(x, w, b, None, None, 3, 1e-5, "gelu")
        runs.append([y, mean, rstd, *tg.backward_grads(dy, x, mean, rstd, w, b, None, None, 3, "gelu", True)[:3]])
    for a, c in zip(*runs):
        assert torch.equal(a, c)
    # forward_output (no statistics written) gives forward's y bit for bit.
    assert torch.equal(tg.forward_output(x, w, b, None, None, 3, 1e-5, "gelu"), runs[0][0])


@pytest.mark.parametrize("path", ["group", "split"])
def test_backward_partial_needs(monkeypatch, path):
    """Only the gradients asked for are made; each equals the full backward's."""
    monkeypatch.setattr(plan, "FUSED_MAX_GROUP", 0)
    monkeypatch.setattr(plan, "GROUP_BLOCK", 16)
    monkeypatch.setattr(plan, "BACKWARD_TILE", 16)
    if path == "split":
        monkeypatch.setattr(plan, "GROUP_MAX_GROUP", 0)
        monkeypatch.setattr(plan, "LOOP_BLOCK", 16)
        monkeypatch.setattr(plan, "REDUCE_TILE", 16)
        monkeypatch.setattr(plan, "SPLIT_MIN_CHUNK", 16)
        monkeypatch.setattr(plan, "CPU_NUM_SMS", 64)
    x, dy, w, b = _inputs((2, 6, 4, 5), 3, torch.float64, seed=2)
    y, mean, rstd = tg.forward(x, w, b, None, None, 3, 1e-5, "none")
    full = tg.backward_grads(dy, x, mean, rstd, w, b, None, None, 3, "none", True)
    lay = launch.Layout(x, 3)
    for need in ((True, False, False), (False, True, False), (False, False, True)):
        n, got = _count(lambda: launch._backward(dy, x, lay, mean, rstd, w, b, None, None, "none", *need,
                                                 False, False))
        assert n == (1 if need[0] and path == "group" else 2)
        for g, want, wanted in zip(got[:3], full[:3], need):
            assert (g is None) != wanted
            if wanted:
                assert torch.equal(g, want)
    xd = x.double().cpu().requires_grad_(True)
    wd = w.double().cpu().requires_grad_(True)
    bd = b.double().cpu().requires_grad_(True)
    torch.nn.functional.group_norm(xd, 3, wd, bd, 1e-5).backward(dy.double().cpu())
    for ours, ref in zip(full[:3], (xd.grad, wd.grad, bd.grad)):
        torch.testing.assert_close(ours.cpu(), ref, rtol=1e-9, atol=1e-9)


def test_group_statistics_with_a_large_offset(monkeypatch):
    """The pivot keeps 1e4 + noise out of the float32 sums on the group path too."""
    monkeypatch.setattr(plan, "FUSED_MAX_GROUP", 0)
    monkeypatch.setattr(plan, "GROUP_BLOCK", 16)
    g = torch.Generator().manual_seed(5)
    x = (1e4 + 1e-2 * torch.randn(2, 8, 9, 11, generator=g)).to(DEVICE)
    y, mean, rstd = tg.forward(x, None, None, None, None, 4, 1e-12, "none")
    _, mean_r, rstd_r = reference.forward(x.double().cpu(), None, None, None, None, 4, 1e-12, "none")
    torch.testing.assert_close(rstd.double().cpu(), rstd_r, rtol=1e-3, atol=0)
    std = y.double().reshape(2, 4, -1).std(dim=-1, unbiased=False)
    assert (std - 1.0).abs().max().item() < 1e-3


# --- the direct launch on a GPU ---------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="the direct launch needs a GPU")
@pytest.mark.parametrize("path", ["fused", "group", "split"])
def test_direct_equals_fallback_on_cuda(monkeypatch, path):
    if path != "fused":
        monkeypatch.setattr(plan, "FUSED_MAX_GROUP", 0)
    if path == "split":
        monkeypatch.setattr(plan, "GROUP_MAX_GROUP", 0)
    x, dy, w, b = _inputs((2, 64, 17, 19), 8, torch.float16, channels_last=True)
    assert direct.DIRECT, "a supported Triton on CUDA launches directly"

    def run():
        y, mean, rstd = tg.forward(x, w, b, None, None, 8, 1e-5, "silu")
        return [y, mean, rstd, *tg.backward_grads(dy, x, mean, rstd, w, b, None, None, 8, "silu", True)[:3]]

    first = run()          # compiles (fallback)
    before = sum(k.direct_launches for k in launch.LAUNCHERS)
    direct_out = run()     # cached: direct
    assert sum(k.direct_launches for k in launch.LAUNCHERS) > before
    monkeypatch.setattr(direct, "DIRECT", False)
    fallback_out = run()
    for a, c, f in zip(first, direct_out, fallback_out):
        assert torch.equal(a, c) and torch.equal(a, f)
    # An unaligned view of x takes another compiled kernel and the right answer.
    monkeypatch.setattr(direct, "DIRECT", True)
    flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:]
    xu = flat.view(x.shape[0], *x.shape[2:], x.shape[1]).movedim(-1, 1)
    xu.copy_(x)
    for _ in range(2):
        yu, _, _ = tg.forward(xu, w, b, None, None, 8, 1e-5, "silu")
        assert torch.equal(yu, first[0])


# --- the everyday eager call on the Triton backend ------------------------------------

def _triton_everyday():
    from groupnorm.backends import registry

    return registry.use_backend("triton", DEVICE)


@pytest.mark.parametrize("channels_last", [False, True])
def test_everyday_call_runs_the_triton_entries(monkeypatch, channels_last):
    """The lean call (groupnorm.everyday) on the Triton backend: forward one launch, no
    statistics tensors; with gradients one forward launch, then at most two; torch's
    results."""
    from groupnorm import everyday
    import torch.nn.functional as F

    monkeypatch.setattr(plan, "FUSED_MAX_GROUP", 0)
    monkeypatch.setattr(plan, "GROUP_BLOCK", 16)
    monkeypatch.setattr(plan, "BACKWARD_TILE", 16)
    x, dy, w, b = _inputs((2, 8, 5, 6), 4, torch.float64, channels_last=channels_last, seed=11)
    if DEVICE == "cpu":
        ctx = _triton_everyday()
    else:
        import contextlib
        ctx = contextlib.nullcontext()
    with ctx:
        n, y = _count(lambda: everyday.output(x, 4, w, b, 1e-5, "silu"))
        assert n == 1 and y is not None and y.stride() == x.stride()
        assert torch.equal(y, tg.forward(x, w, b, None, None, 4, 1e-5, "silu")[0])
        xg, wg, bg = (t.detach().clone().requires_grad_() for t in (x, w, b))
        n, yg = _count(lambda: everyday.output(xg, 4, wg, bg, 1e-5, "silu"))
        assert n == 1 and type(yg.grad_fn).__name__ == "KnownFunctionBackward"
        assert torch.equal(yg.detach(), y)
        n, grads = _count(lambda: torch.autograd.grad(yg, (xg, wg, bg), dy))
        assert n == 2
        xo = x.detach().clone().requires_grad_()
        n, yo = _count(lambda: everyday.output(xo, 4, w, b, 1e-5, "silu"))
        n, (gx,) = _count(lambda: torch.autograd.grad(yo, (xo,), dy))
        assert n == 1 and torch.equal(gx, grads[0])
    xr, wr, br = (t.detach().cpu().clone().requires_grad_() for t in (x, w, b))
    F.silu(F.group_norm(xr, 4, wr, br, 1e-5)).backward(dy.cpu())
    for ours, ref in zip(grads, (xr.grad, wr.grad, br.grad)):
        torch.testing.assert_close(ours.cpu(), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape,groups,block", [((2, 12, 3, 5), 2, 32), ((1, 8, 2, 3, 3), 2, 64),
                                               ((2, 6, 40), 3, 16)])
def test_group_forward_nchw_tiles(monkeypatch, shape, groups, block):
    """The NCHW apply's [TILE_C, TILE_HW] tiles (several channels per tile, partial tiles
    in both directions) against the float64 reference, with every epilogue piece."""
    monkeypatch.setattr(plan, "FUSED_MAX_GROUP", 0)
    monkeypatch.setattr(plan, "GROUP_BLOCK", block)
    x, _, w, b = _inputs(shape, groups, torch.float32, seed=6)
    gen = torch.Generator().manual_seed(8)
    sc = (0.3 * torch.randn(shape[0], shape[1], generator=gen)).to(DEVICE)
    sh = (0.3 * torch.randn(shape[0], shape[1], generator=gen)).to(DEVICE)
    p = launch.forward_plan(launch.Layout(x, groups))
    assert p.path == "group" and p.tile_c * p.tile_hw <= block
    y, mean, rstd = tg.forward(x, w, b, sc, sh, groups, 1e-5, "mish")
    want = reference.forward(*(t.double().cpu() for t in (x, w, b, sc, sh)), groups, 1e-5, "mish")
    for ours, ref in zip((y, mean, rstd), want):
        torch.testing.assert_close(ours.double().cpu(), ref, rtol=2e-5, atol=2e-5)
