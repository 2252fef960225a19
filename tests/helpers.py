"""Shared test helpers: fresh inputs, the float64 oracle and dtype-aware comparisons."""
from __future__ import annotations

import contextlib

import pytest
import torch

from groupnorm import reference
from groupnorm.backends import registry

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Absolute slack per dtype on top of the "twice torch's own error" rule.
ATOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_input(shape, dtype=torch.float32, channels_last=False, seed=None, mean=-2.3, std=0.5):
    """Fresh random input with a non-zero mean (never zeros), optionally channels-last."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    x = (mean + std * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        assert x.movedim(1, -1).is_contiguous()
    return x


def assert_fwd_bwd_matches_torch(fn, x, num_groups, weight, bias, dy):
    """fn(x, G, w, b) (our group_norm) and its gradients of (x, w, b) against torch's
    F.group_norm in float32, float64 deciding (assert_oracle_close: ATen's channels-last
    float32 path is the less accurate side). x, w, b require grad. -> (y, grads, torch's y)."""
    import torch.nn.functional as F

    y = fn(x, num_groups, weight, bias)
    got = torch.autograd.grad(y, (x, weight, bias), dy)
    ref = F.group_norm(x, num_groups, weight, bias)
    want = torch.autograd.grad(ref, (x, weight, bias), dy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    ref64 = F.group_norm(x64, num_groups, w64, b64)
    want64 = torch.autograd.grad(ref64, (x64, w64, b64), dy.double())
    assert_oracle_close(y.detach(), ref.detach(), ref64.detach(), torch.float32)
    for a, e, e64 in zip(got, want, want64):
        assert_oracle_close(a, e, e64, torch.float32)
    return y, got, ref


def make_params(c, dtype=torch.float32, seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    w = (1.0 + 0.3 * torch.randn(c, generator=gen, dtype=torch.float64)).to(dtype)
    b = (0.2 * torch.randn(c, generator=gen, dtype=torch.float64)).to(dtype)
    return w, b


def oracle(x, num_groups, weight=None, bias=None, eps=1e-5, activation="none", scale=None, shift=None):
    """The reference computed in float64 on float64 copies."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    y, _, _ = reference.forward(x.double(), d(weight), d(bias), d(scale), d(shift), num_groups, eps, activation)
    return y


def assert_oracle_close(ours, peer, ref64, dtype, factor=2.0):
    """max|ours - ref64| <= factor * max|peer - ref64| + atol (flash-attn's oracle rule):
    we may not be less accurate than torch in the same dtype, against float64 truth."""
    assert ours.dtype == dtype, (ours.dtype, dtype)
    assert ours.shape == ref64.shape
    assert not torch.isnan(ours).any(), "NaN in output (an element was left unwritten?)"
    err = (ours.double() - ref64).abs().max().item() if ours.numel() else 0.0
    peer_err = (peer.double() - ref64).abs().max().item() if ours.numel() else 0.0
    bound = factor * peer_err + ATOL[dtype] * (1 + (ref64.abs().max().item() if ours.numel() else 0.0))
    assert err <= bound, f"max error {err:.3e} above {bound:.3e} (torch's own error {peer_err:.3e})"


def available_cpu_backends():
    names = []
    for name in ("reference", "numba", "triton"):
        if registry.load(name) is not None:
            names.append(name)
    return names


@contextlib.contextmanager
def cpu_backend(name):
    """Run groupnorm ops on CPU tensors with the named backend (skip if it is unavailable)."""
    if registry.load(name) is None:
        pytest.skip(f"backend {name} unavailable")
    with registry.use_backend(name, "cpu"):
        yield


def assert_backward_matches_reference(outs, dy, x, mean, rstd, weight, bias, scale, shift, groups, act):
    """A backward kernel's (dx, (N, C) sums of dz1 * xhat and of dz1, dweight, dbias)
    against the float64 reference. mean, rstd (N, G) and weight, bias, scale, shift: the
    float64 values the kernel was given (None where absent; without weight, dweight and
    dbias are not checked). Tolerances by x's dtype, sums scaled with sqrt(HW)."""
    dx, s1, s0, dw, db = outs
    n, c = x.shape[:2]
    xd = x.double()
    rs1, rs0 = reference.backward_reduce(dy.double(), xd, mean, rstd, weight, bias, scale, shift, groups, act)
    k = (weight if weight is not None else torch.ones(c, dtype=torch.float64)).expand(n, c)
    if scale is not None:
        k = k * (1 + scale)
    g1 = (rs0 * k).view(n, groups, -1).sum(-1)
    g2 = (rs1 * k).view(n, groups, -1).sum(-1)
    count = x.numel() // (n * groups)
    rdx = reference.backward_dx(dy.double(), xd, mean, rstd, weight, bias, scale, shift, g1, g2, count, groups, act)
    tol = {torch.float32: 5e-4, torch.float64: 1e-9, torch.bfloat16: 5e-2}[x.dtype]
    hw = x.numel() // (n * c)
    torch.testing.assert_close(dx.double(), rdx, atol=tol, rtol=tol)
    torch.testing.assert_close(s1.double().view(n, c), rs1, atol=tol * hw ** 0.5, rtol=tol)
    torch.testing.assert_close(s0.double().view(n, c), rs0, atol=tol * hw ** 0.5, rtol=tol)
    if weight is not None:
        torch.testing.assert_close(dw.double(), rs1.sum(0), atol=tol * (n * hw) ** 0.5, rtol=tol)
        torch.testing.assert_close(db.double(), rs0.sum(0), atol=tol * (n * hw) ** 0.5, rtol=tol)


def reference_stats(x, groups, acc):
    """(mean, rstd) of x in float64 from the reference (eps 1e-5), and the same as numpy
    arrays in the accumulation dtype ``acc``: the statistics a backward kernel is given."""
    mean, m2 = reference.stats(x.double(), groups)
    rstd = reference.rstd_from_m2(m2, x.numel() // (x.shape[0] * groups), 1e-5)
    return mean, rstd, mean.to(acc).numpy(), rstd.to(acc).numpy()
