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
