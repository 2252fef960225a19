"""Gradients through the op layer: gradcheck and gradgradcheck in float64, vs torch."""
import pytest
import torch
import torch.nn.functional as F

import groupnorm
from helpers import available_cpu_backends, cpu_backend, make_input, make_params

BACKENDS = available_cpu_backends()


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,groups,channels_last", [((2, 6, 3, 4), 3, False), ((2, 6, 3, 4), 2, True),
                                                        ((3, 4), 2, False), ((2, 6, 5), 6, False)])
def test_gradcheck_float64(backend, shape, groups, channels_last):
    x = _leaf(make_input(shape, torch.float64, channels_last=channels_last))
    w, b = (_leaf(t) for t in make_params(shape[1], torch.float64))
    # fast_mode: a few random projections instead of one backward per output element, which
    # keeps the interpreted Triton kernels affordable; the reference runs the full check.
    with cpu_backend(backend):
        assert torch.autograd.gradcheck(lambda a, c, d: groupnorm.group_norm(a, groups, c, d), (x, w, b),
                                        fast_mode=backend != "reference")


def test_gradgradcheck_float64():
    x = _leaf(make_input((2, 6, 3, 2), torch.float64))
    w, b = (_leaf(t) for t in make_params(6, torch.float64))
    assert torch.autograd.gradgradcheck(lambda a, c, d: groupnorm.group_norm(a, 3, c, d), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda a: groupnorm.group_norm(a, 2), (_leaf(x),))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_torch(backend, dtype):
    x0 = make_input((3, 12, 7, 5), dtype)
    w0, b0 = make_params(12)
    dy = torch.randn(x0.shape, dtype=torch.float64).to(dtype)
    grads = []
    for fn, ctx in ((F.group_norm, None), (groupnorm.group_norm, backend)):
        x, w, b = _leaf(x0), _leaf(w0), _leaf(b0)
        if ctx is None:
            fn(x, 4, w, b).backward(dy)
        else:
            with cpu_backend(ctx):
                fn(x, 4, w, b).backward(dy)
        grads.append((x.grad, w.grad, b.grad))
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    for ours, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours.float(), theirs.float(), atol=tol, rtol=tol)


def test_only_weight_requires_grad():
    x = make_input((2, 6, 5))
    w = torch.ones(6, requires_grad=True)
    groupnorm.group_norm(x, 3, w).sum().backward()
    w2 = torch.ones(6, requires_grad=True)
    F.group_norm(x, 3, w2).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)
