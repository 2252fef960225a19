"""The eager fast path and the custom-op path give identical results and gradients."""
import pytest
import torch

import groupnorm
from groupnorm import eager
from helpers import make_input, make_params


def _run(x0, w0, b0, s0, h0, dy, activation):
    leaf = lambda t: None if t is None else t.detach().clone().requires_grad_(True)  # noqa: E731
    x, w, b, s, h = (leaf(t) for t in (x0, w0, b0, s0, h0))
    y = groupnorm.group_norm(x, 4, w, b, activation=activation, scale=s, shift=h)
    grads = torch.autograd.grad(y, [t for t in (x, w, b, s, h) if t is not None], dy)
    return [y.detach(), *grads]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation,modulate", [("none", False), ("silu", True)])
def test_fast_path_equals_custom_op_path(monkeypatch, channels_last, activation, modulate):
    x = make_input((2, 8, 6, 5), channels_last=channels_last)
    w, b = make_params(8)
    s, h = (0.2 * torch.randn(2, 8), 0.2 * torch.randn(2, 8)) if modulate else (None, None)
    dy = torch.randn(x.shape)
    fast = _run(x, w, b, s, h, dy, activation)
    monkeypatch.setattr(eager, "ENABLED", False)
    slow = _run(x, w, b, s, h, dy, activation)
    for a, c in zip(fast, slow):
        assert torch.equal(a, c)


def test_fast_path_is_taken_in_eager_and_not_under_modes(monkeypatch):
    calls = []
    original = eager.group_norm
    monkeypatch.setattr(eager, "group_norm", lambda *a: calls.append(1) or original(*a))
    x = make_input((2, 4, 3))
    groupnorm.group_norm(x, 2)
    assert calls == [1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        groupnorm.group_norm(x, 2)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        groupnorm.group_norm(x, 2)
    assert calls == [1], "autocast and dispatch modes must go through the custom op"


def test_double_backward_through_fast_path():
    leaf = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
    x = leaf(make_input((2, 6, 3, 2), torch.float64))
    w, b = (leaf(t) for t in make_params(6, torch.float64))
    assert torch.autograd.gradgradcheck(lambda a, c, d: groupnorm.group_norm(a, 3, c, d, activation="silu"), (x, w, b))
