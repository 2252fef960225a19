"""The everyday call's shortcut (groupnorm.everyday): taken exactly when nothing about the
call is unusual, and then the same bits as the general path; every other call (errors
included) falls through to the general path."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import groupnorm
from groupnorm import eager, everyday, ops
from groupnorm.backends import registry
from helpers import make_input

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _params(c, dtype, seed=1, kind=torch.Tensor):
    g = torch.Generator().manual_seed(seed)
    w = (1 + 0.3 * torch.randn(c, generator=g, dtype=torch.float64)).to(dtype)
    b = (0.2 * torch.randn(c, generator=g, dtype=torch.float64)).to(dtype)
    if kind is torch.nn.Parameter:
        return torch.nn.Parameter(w, requires_grad=False), torch.nn.Parameter(b, requires_grad=False)
    return w, b


def _general(x, groups, w, b, act="none"):
    """What the custom-op path returns for the same call."""
    return ops.forward(x, w, b, None, None, groups, 1e-5, act)[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,cl", [((2, 12, 5, 7), False), ((2, 12, 5, 7), True), ((2, 12, 3, 4, 5), True),
                                      ((3, 12), False), ((2, 12, 9), False), ((1, 64, 40, 30), False),
                                      ((1, 64, 40, 30), True)])
def test_everyday_call_is_taken_and_equals_the_general_path(shape, cl, dtype):
    x = make_input(shape, dtype, channels_last=cl, seed=2)
    w, b = _params(shape[1], dtype, kind=torch.nn.Parameter)
    y = everyday.output(x, 4, w, b, 1e-5, None)
    assert y is not None, "an everyday call must take the shortcut"
    assert y.stride() == x.stride() and y.dtype == dtype
    assert torch.equal(y, _general(x, 4, w, b))
    torch.testing.assert_close(y.double(), F.group_norm(x.double(), 4, w.double(), b.double()),
                               atol={torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 3e-2), rtol=0)


@pytest.mark.parametrize("weights", ["none", "float32 for bfloat16", "weight only"])
def test_parameter_variants(weights):
    x = make_input((2, 8, 6, 6), torch.bfloat16 if weights == "float32 for bfloat16" else torch.float32, seed=3)
    w, b = _params(8, torch.float32)
    if weights == "none":
        w = b = None
    elif weights == "weight only":
        b = None
    y = everyday.output(x, 2, w, b, 1e-5, "silu")
    assert y is not None
    assert torch.equal(y, _general(x, 2, w, b, "silu"))


def test_grad_call_goes_through_autograd_with_torchs_gradients():
    x = make_input((2, 8, 4, 5), seed=4).requires_grad_()
    w, b = (t.requires_grad_() for t in _params(8, torch.float32))
    y = everyday.output(x, 4, w, b, 1e-5, None)
    assert y is not None and y.grad_fn is not None
    dy = torch.randn(y.shape)
    got = torch.autograd.grad(y, (x, w, b), dy)
    want = torch.autograd.grad(F.group_norm(x, 4, w, b), (x, w, b), dy)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


def test_inference_mode():
    x = make_input((2, 8, 4, 5), seed=5)
    w, b = _params(8, torch.float32)
    with torch.inference_mode():
        y = groupnorm.group_norm(x, 4, w, b)
    assert torch.equal(y, _general(x, 4, w, b))


class _Sub(torch.Tensor):
    pass


def _x():
    return make_input((2, 8, 4, 5), seed=6)


# Calls the shortcut must leave to the general path (which checks, raises or handles them).
UNUSUAL = {
    "tensor subclass": lambda: (_x().as_subclass(_Sub), 4, None, None, None),
    "float num_groups": lambda: (_x(), 4.0, None, None, None),
    "bool num_groups": lambda: (_x(), True, None, None, None),
    "zero groups": lambda: (_x(), 0, None, None, None),
    "groups not dividing C": lambda: (_x(), 3, None, None, None),
    "integer input": lambda: (torch.ones(2, 8, 4, dtype=torch.int32), 4, None, None, None),
    "one value per group": lambda: (torch.randn(1, 4), 4, None, None, None),
    "empty input": lambda: (torch.randn(0, 8, 3), 4, None, None, None),
    "1-D input": lambda: (torch.randn(8), 4, None, None, None),
    "weight of wrong size": lambda: (_x(), 4, torch.ones(7), None, None),
    "weight of another dtype": lambda: (_x(), 4, torch.ones(8, dtype=torch.float64), None, None),
    "weight and bias dtypes differ": lambda: (_x().bfloat16(), 4, torch.ones(8), torch.zeros(8, dtype=torch.bfloat16),
                                              None),
    "weight not a tensor": lambda: (_x(), 4, [1.0] * 8, None, None),
    "activation spelled in capitals": lambda: (_x(), 4, None, None, "SiLU"),
    "unknown activation": lambda: (_x(), 4, None, None, "swish"),
    "non-contiguous input": lambda: (_x().transpose(2, 3), 4, None, None, None),
    "3-D channels-last strides": lambda: (_x()[:, :, :, 0].movedim(1, -1).contiguous().movedim(-1, 1), 4, None,
                                          None, None),
}


@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_unusual_calls_take_the_general_path(name):
    x, groups, w, b, act = UNUSUAL[name]()
    assert everyday.output(x, groups, w, b, 1e-5, act) is None


def test_unusual_states_take_the_general_path(monkeypatch):
    x = _x()
    assert everyday.output(x, 4, None, None, 1e-5, None) is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert everyday.output(x, 4, None, None, 1e-5, None) is None

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        assert everyday.output(x, 4, None, None, 1e-5, None) is None

    class FunctionMode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with FunctionMode():
        assert everyday.output(x, 4, None, None, 1e-5, None) is None
    seen = []
    torch.func.vmap(lambda t: seen.append(everyday.output(t, 4, None, None, 1e-5, None)) or t)(x)
    assert seen == [None]
    monkeypatch.setattr(eager, "ENABLED", False)
    assert everyday.output(x, 4, None, None, 1e-5, None) is None


def test_compiling_state_is_read(monkeypatch):
    """While dynamo or export traces, the shortcut stays out of the way, so tracing sees
    the custom op (test_toolchain compiles through it)."""
    x = _x()
    monkeypatch.setattr(everyday, "_compiling", lambda: True)
    assert everyday.output(x, 4, None, None, 1e-5, None) is None


def test_backend_override_is_followed(monkeypatch):
    calls = []
    reference = registry.load("reference")
    real = reference.forward
    monkeypatch.setattr(reference, "forward", lambda *a: calls.append(1) or real(*a))
    x = _x()
    with registry.use_backend("reference", "cpu"):
        y = everyday.output(x, 4, None, None, 1e-5, None)
    assert calls == [1]
    torch.testing.assert_close(y, F.group_norm(x, 4))
    monkeypatch.setenv("GROUPNORM_BACKEND_CPU", "reference")
    everyday.output(x, 4, None, None, 1e-5, None)
    assert calls == [1, 1]
    monkeypatch.delenv("GROUPNORM_BACKEND_CPU")
    everyday.output(x, 4, None, None, 1e-5, None)
    assert calls == [1, 1] or registry.backend_name("cpu") == "reference"


def _leaves(shape, dtype=torch.float64, cl=False, param_dtype=None, seed=7):
    x = make_input(shape, dtype, channels_last=cl, seed=seed).requires_grad_()
    w, b = (torch.nn.Parameter(t) for t in _params(shape[1], param_dtype or dtype, seed=seed))
    return x, w, b


@pytest.mark.parametrize("cl", [False, True])
def test_known_function_gradcheck_and_double_backward(cl):
    x, w, b = _leaves((2, 8, 5, 6), cl=cl)
    fn = lambda a, c, d: groupnorm.group_norm(a, 4, c, d)  # noqa: E731
    assert type(fn(x, w, b).grad_fn).__name__ == "KnownFunctionBackward"
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("wanted", ["x", "weight", "bias", "weight and bias"])
def test_known_function_partial_gradients(wanted):
    """Only some inputs require grad: those get torch's gradients, the others none."""
    x, w, b = _leaves((2, 8, 4, 5), torch.float32, seed=8)
    x.requires_grad_("x" in wanted)
    w.requires_grad_("weight" in wanted)
    b.requires_grad_("bias" in wanted)
    dy = torch.randn(2, 8, 4, 5)
    groupnorm.group_norm(x, 4, w, b).backward(dy)
    xr, wr, br = (t.detach().clone().requires_grad_(t.requires_grad) for t in (x, w, b))
    F.group_norm(xr, 4, wr, br).backward(dy)
    for ours, theirs in ((x, xr), (w, wr), (b, br)):
        if theirs.requires_grad:
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-5)
        else:
            assert ours.grad is None


@pytest.mark.parametrize("cl", [False, True])
def test_known_function_gradient_of_another_layout(cl):
    """dy with other strides than y (an expanded sum's gradient, the other memory
    format): read correctly, dx in x's layout."""
    x, w, b = _leaves((2, 8, 4, 5), torch.float64, cl=cl, seed=9)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    (groupnorm.group_norm(x, 4, w, b) * 1.5).sum().backward()
    (F.group_norm(xr, 4, wr, br) * 1.5).sum().backward()
    dy = make_input((2, 8, 4, 5), torch.float64, channels_last=not cl, seed=10)
    gx, gw, gb = torch.autograd.grad(groupnorm.group_norm(x, 4, w, b), (x, w, b), dy)
    rx, rw, rb = torch.autograd.grad(F.group_norm(xr, 4, wr, br), (xr, wr, br), dy)
    assert gx.stride() == x.stride()
    for a, c in ((x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad), (gx, rx), (gw, rw), (gb, rb)):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-10)


def test_known_function_half_input_float32_parameters():
    x, w, b = _leaves((2, 8, 6, 6), torch.bfloat16, param_dtype=torch.float32, seed=11)
    dy = make_input((2, 8, 6, 6), torch.bfloat16, seed=12)
    got = torch.autograd.grad(groupnorm.group_norm(x, 4, w, b), (x, w, b), dy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    want = torch.autograd.grad(F.group_norm(x64, 4, w64, b64), (x64, w64, b64), dy.double())
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    for a, c in zip(got, want):
        torch.testing.assert_close(a.double(), c, rtol=2e-2, atol=2e-2 * max(1.0, c.abs().max().item()))


def test_known_function_sees_in_place_changes():
    """x, weight and bias are saved tensors: changing one in place before the backward
    raises autograd's error instead of giving wrong gradients."""
    x, w, b = _leaves((2, 8, 4, 5), torch.float32, seed=13)
    y = groupnorm.group_norm(x * 1.0, 4, w, b)
    with torch.no_grad():
        w.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
