"""The eager fast path and the custom-op path give identical results and gradients."""
import pytest
import torch

import groupnorm
from groupnorm import eager, ops
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


def _count_op_calls(monkeypatch):
    """Calls of the groupnorm::forward custom op (the path everything unusual takes)."""
    calls = []
    original = ops.forward
    monkeypatch.setattr(ops, "forward", lambda *a: calls.append(1) or original(*a))
    return calls


def test_fast_path_is_taken_in_eager_and_not_under_modes(monkeypatch):
    calls = _count_op_calls(monkeypatch)
    x = make_input((2, 4, 3))
    groupnorm.group_norm(x, 2)
    assert calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        groupnorm.group_norm(x, 2)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        groupnorm.group_norm(x, 2)
    assert calls == [1, 1], "autocast and dispatch modes must go through the custom op"


@pytest.mark.parametrize("grad", [False, True])
def test_module_parameters_take_the_fast_path(monkeypatch, grad):
    """nn.Parameter weights (every module's) skip the custom-op dispatch too, with and
    without autograd, and give torch's results and gradients."""
    calls = _count_op_calls(monkeypatch)
    ours, theirs = groupnorm.GroupNorm(4, 8), torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(1 + 0.3 * torch.randn(8, generator=torch.Generator().manual_seed(1)))
            m.bias.copy_(0.3 * torch.randn(8, generator=torch.Generator().manual_seed(2)))
    x = make_input((2, 8, 5, 3))
    with torch.set_grad_enabled(grad):
        y, want = ours(x), theirs(x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert calls == []
    assert y.requires_grad == grad
    if grad:
        dy = torch.randn(y.shape)
        got = torch.autograd.grad(y, [ours.weight, ours.bias], dy)
        expected = torch.autograd.grad(want, [theirs.weight, theirs.bias], dy)
        for a, c in zip(got, expected):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


def test_double_backward_through_fast_path():
    leaf = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
    x = leaf(make_input((2, 6, 3, 2), torch.float64))
    w, b = (leaf(t) for t in make_params(6, torch.float64))
    assert torch.autograd.gradgradcheck(lambda a, c, d: groupnorm.group_norm(a, 3, c, d, activation="silu"), (x, w, b))


def test_parameters_with_scale_shift_skip_the_op_dispatch(monkeypatch):
    """The general eager path (scale/shift given, so not the everyday shortcut) also reads
    nn.Parameter weights directly, with the same results as the custom op."""
    calls = _count_op_calls(monkeypatch)
    x = make_input((2, 8, 4, 4))
    w, b = (torch.nn.Parameter(t) for t in make_params(8))
    s, h = 0.2 * torch.randn(2, 8), 0.2 * torch.randn(2, 8)
    y = groupnorm.group_norm(x, 4, w, b, scale=s, shift=h, activation="silu")
    assert calls == []
    want = ops.forward(x, w.detach(), b.detach(), s, h, 4, 1e-5, "silu")[0]
    assert torch.equal(y.detach(), want)
