"""Forward-mode AD and torch.func on our layer, against torch's own group_norm (and the
torch-ops composition for the fused variants), on the Numba and Triton (interpreter) backends.

Inputs are float64 with a non-zero mean, so every comparison is tight; the kernel routes
are asserted by spying on the stage they must call.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F

import groupnorm
from groupnorm import group_norm, ops, reference, transforms
from helpers import cpu_backend, make_input

BACKENDS = ["numba", "triton"]
F64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-9)
FUSED = [("silu", False), ("gelu_tanh", True), ("mish", True), ("none", True)]


def _inputs(shape=(2, 6, 3, 4), seed=0, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(shape, F64, channels_last=channels_last, seed=seed)
    c, n = shape[1], shape[0]
    w = 1.0 + 0.3 * torch.randn(c, generator=gen, dtype=F64)
    b = 0.2 * torch.randn(c, generator=gen, dtype=F64)
    s = 0.3 * torch.randn(n, c, generator=gen, dtype=F64)
    h = 0.3 * torch.randn(n, c, generator=gen, dtype=F64)
    return x, w, b, s, h


def _tangents(*ts, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in ts)


def _oracle(x, w, b, s=None, h=None, act="none", groups=3):
    return reference.differentiable_group_norm(x, w, b, s, h, groups, 1e-5, act)


@pytest.fixture(params=BACKENDS)
def backend(request):
    with cpu_backend(request.param):
        yield request.param


@pytest.fixture
def kernel_spy(monkeypatch):
    """Counts the tangents computed with the kernels and with torch ops."""
    calls = {"kernel": 0, "composable": 0}
    real = transforms.tangent

    def tangent(*a, kernels=True, **k):
        calls["kernel" if kernels else "composable"] += 1
        return real(*a, kernels=kernels, **k)

    monkeypatch.setattr(transforms, "tangent", tangent)
    return calls


@pytest.mark.parametrize("channels_last", [False, True])
def test_func_jvp_matches_torch(backend, kernel_spy, channels_last):
    x, w, b, _, _ = _inputs(channels_last=channels_last)
    tx, tw, tb = _tangents(x, w, b)
    y, dy = torch.func.jvp(lambda a, ww, bb: group_norm(a, 3, ww, bb), (x, w, b), (tx, tw, tb))
    # torch's own jvp fails on channels-last input (a view in its formula): compare contiguous.
    ry, rdy = torch.func.jvp(lambda a, ww, bb: F.group_norm(a, 3, ww, bb), (x.contiguous(), w, b),
                             (tx.contiguous(), tw, tb))
    torch.testing.assert_close(y, ry, **TOL)
    torch.testing.assert_close(dy, rdy, **TOL)
    assert dy.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert kernel_spy["kernel"] >= 1 and kernel_spy["composable"] == 0


@pytest.mark.parametrize("act,modulated", FUSED)
def test_func_jvp_fused_variants(backend, act, modulated):
    x, w, b, s, h = _inputs()
    if not modulated:
        s = h = None
    primals = tuple(t for t in (x, w, b, s, h) if t is not None)
    tangents = _tangents(*primals)

    def ours(*p):
        return group_norm(p[0], 3, p[1], p[2], activation=act, scale=p[3] if modulated else None,
                          shift=p[4] if modulated else None)

    def ref(*p):
        return _oracle(p[0], p[1], p[2], *(p[3:5] if modulated else (None, None)), act=act)

    _, got = torch.func.jvp(ours, primals, tangents)
    _, want = torch.func.jvp(ref, primals, tangents)
    torch.testing.assert_close(got, want, **TOL)


def test_forward_ad_dual_tensors(backend):
    x, w, b, _, _ = _inputs()
    tx, tw = _tangents(x, w)
    with fwad.dual_level():
        y = group_norm(fwad.make_dual(x, tx), 3, fwad.make_dual(w, tw), b)
        got = fwad.unpack_dual(y).tangent
        ry = F.group_norm(fwad.make_dual(x, tx), 3, fwad.make_dual(w, tw), b)
        want = fwad.unpack_dual(ry).tangent
    assert got is not None
    torch.testing.assert_close(got, want, **TOL)


def test_forward_ad_tangent_only_on_weight(backend):
    x, w, b, _, _ = _inputs()
    (tw,) = _tangents(w)
    with fwad.dual_level():
        got = fwad.unpack_dual(group_norm(x, 3, fwad.make_dual(w, tw), b)).tangent
        want = fwad.unpack_dual(F.group_norm(x, 3, fwad.make_dual(w, tw), b)).tangent
    torch.testing.assert_close(got, want, **TOL)


def test_jacfwd_and_hessian(backend):
    x, w, b, _, _ = _inputs(shape=(1, 6, 2, 2))
    f_ours = lambda a: group_norm(a, 3, w, b)  # noqa: E731
    f_ref = lambda a: F.group_norm(a, 3, w, b)  # noqa: E731
    torch.testing.assert_close(torch.func.jacfwd(f_ours)(x), torch.func.jacfwd(f_ref)(x), **TOL)
    g_ours = lambda a: (group_norm(a, 3, w, b) ** 3).sum()  # noqa: E731
    g_ref = lambda a: (F.group_norm(a, 3, w, b) ** 3).sum()  # noqa: E731
    torch.testing.assert_close(torch.func.hessian(g_ours)(x), torch.func.hessian(g_ref)(x), rtol=1e-7, atol=1e-7)


def test_grad_and_jacrev(backend):
    x, w, b, _, _ = _inputs()
    loss = lambda f: (lambda a, ww: (f(a, 3, ww, b) * torch.arange(a.numel(), dtype=F64).reshape(a.shape)).sum())  # noqa: E731,E501
    got = torch.func.grad(loss(group_norm), argnums=(0, 1))(x, w)
    want = torch.func.grad(loss(F.group_norm), argnums=(0, 1))(x, w)
    torch.testing.assert_close(got, want, **TOL)
    small = x[:1, :, :2, :2]
    torch.testing.assert_close(torch.func.jacrev(lambda a: group_norm(a, 3, w, b))(small),
                               torch.func.jacrev(lambda a: F.group_norm(a, 3, w, b))(small), **TOL)


@pytest.mark.parametrize("over", ["x", "weight", "bias", "all"])
def test_vmap_matches_loop_of_torch(backend, over):
    x, w, b, _, _ = _inputs()
    B = 3
    xs = torch.stack([x + i for i in range(B)]) if over in ("x", "all") else x
    ws = torch.stack([w * (1 + i) for i in range(B)]) if over in ("weight", "all") else w
    bs = torch.stack([b - i for i in range(B)]) if over in ("bias", "all") else b
    dims = tuple(0 if name in (over, "all") or over == "all" else None for name in ("x", "weight", "bias"))
    got = torch.func.vmap(lambda a, ww, bb: group_norm(a, 3, ww, bb), in_dims=dims)(xs, ws, bs)
    pick = lambda t, d, i: t[i] if d == 0 else t  # noqa: E731
    want = torch.stack([F.group_norm(pick(xs, dims[0], i), 3, pick(ws, dims[1], i), pick(bs, dims[2], i))
                        for i in range(B)])
    torch.testing.assert_close(got, want, **TOL)


def test_vmap_fused_scale_shift_and_nested(backend):
    x, w, b, s, h = _inputs()
    B, D = 2, 2
    xs = torch.stack([torch.stack([x * (1 + i) + j for j in range(D)]) for i in range(B)])
    ss = torch.stack([s + i for i in range(B)])
    f = lambda a, sc: group_norm(a, 3, w, b, activation="silu", scale=sc, shift=h)  # noqa: E731
    got = torch.func.vmap(torch.func.vmap(f, in_dims=(0, None)), in_dims=(0, 0))(xs, ss)
    want = torch.stack([torch.stack([_oracle(xs[i, j], w, b, ss[i], h, act="silu") for j in range(D)])
                        for i in range(B)])
    torch.testing.assert_close(got, want, **TOL)


def test_vmap_over_grad_per_sample_gradients(backend):
    x, w, b, _, _ = _inputs(shape=(4, 6, 3, 3))
    m = groupnorm.GroupNorm(3, 6).double()
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p, sample):
        out = torch.func.functional_call(m, p, (sample.unsqueeze(0),))
        return (out ** 2 * torch.linspace(0, 1, out.numel(), dtype=F64).reshape(out.shape)).sum()

    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    ref = torch.nn.GroupNorm(3, 6).double()
    want = torch.func.vmap(torch.func.grad(
        lambda p, sample: (torch.func.functional_call(ref, p, (sample.unsqueeze(0),)) ** 2
                           * torch.linspace(0, 1, sample.numel(), dtype=F64).reshape((1,) + sample.shape)).sum()),
        in_dims=(None, 0))(params, x)
    for k in params:
        torch.testing.assert_close(got[k], want[k], **TOL)


@pytest.mark.parametrize("act,modulated", [("none", False), ("silu", True)])
def test_gradcheck_forward_ad_and_batched(backend, act, modulated):
    x, w, b, s, h = _inputs(shape=(2, 4, 2, 3))
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    mods = [t.clone().requires_grad_() for t in (s[:, :4], h[:, :4])] if modulated else []

    def fn(a, ww, bb, *m):
        return group_norm(a, 2, ww, bb, activation=act, scale=m[0] if m else None, shift=m[1] if m else None)

    assert torch.autograd.gradcheck(fn, (*args, *mods), check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)


def test_numba_and_triton_tangents_agree():
    x, w, b, s, h = _inputs()
    tangents = _tangents(x, w, b, s, h)
    f = lambda *p: group_norm(p[0], 3, p[1], p[2], activation="gelu", scale=p[3], shift=p[4])  # noqa: E731
    outs = []
    for name in BACKENDS:
        with cpu_backend(name):
            outs.append(torch.func.jvp(f, (x, w, b, s, h), tangents)[1])
    torch.testing.assert_close(outs[0], outs[1], **TOL)


def test_vmap_rule_of_the_custom_op(backend):
    x, w, b, s, h = _inputs()
    B = 3
    xs = torch.stack([x * (i + 1) for i in range(B)])
    ws = torch.stack([w + i for i in range(B)])
    op = torch.ops.groupnorm.forward
    got_y, got_mean, got_rstd = torch.func.vmap(
        lambda a, ww: op(a, ww, b, s, h, 3, 1e-5, "silu"))(xs, ws)
    for i in range(B):
        torch.testing.assert_close(got_y[i], _oracle(xs[i], ws[i], b, s, h, act="silu"), **TOL)
        ref_mean = xs[i].reshape(2, 3, -1).mean(-1)
        torch.testing.assert_close(got_mean[i], ref_mean, **TOL)
