"""Fused epilogues (scale/shift, activation) against the unfused torch composition."""
import pytest
import torch
import torch.nn.functional as F

import groupnorm
from groupnorm.epilogue import ACTIVATIONS, torch_activation
from helpers import available_cpu_backends, cpu_backend, make_input, make_params

BACKENDS = available_cpu_backends()


def unfused(x, groups, w, b, activation, scale=None, shift=None):
    """What users write today: F.group_norm, then modulation, then the activation."""
    z = F.group_norm(x, groups, w, b)
    view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    if scale is not None:
        z = z * (1 + scale.reshape(view))
    if shift is not None:
        z = z + shift.reshape(view)
    return torch_activation(activation)(z)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("modulate", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_equals_unfused_composition(backend, activation, modulate, channels_last):
    x = make_input((2, 12, 5, 7), torch.float64, channels_last=channels_last)
    w, b = make_params(12, torch.float64)
    scale = 0.3 * torch.randn(2, 12, dtype=torch.float64) if modulate else None
    shift = 0.3 * torch.randn(2, 12, dtype=torch.float64) if modulate else None
    with cpu_backend(backend):
        y = groupnorm.group_norm(x, 4, w, b, activation=activation, scale=scale, shift=shift)
    torch.testing.assert_close(y, unfused(x, 4, w, b, activation, scale, shift), atol=1e-10, rtol=1e-10)
    assert y.stride() == x.stride()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_infinite_pre_activation_gives_torchs_values(backend, activation, dtype):
    """z1 = -inf / +inf (an infinite bias) through each activation: torch's NaN or limit.
    ATen's own kernels: on AVX-512 CPUs torch hands GELU to oneDNN, whose gelu(+inf) is NaN
    (ATen's: +inf), so torch answers per machine there; the reference backend calls torch."""
    x = make_input((2, 8, 3, 5), dtype)
    w, b = make_params(8, dtype)
    b = b.clone()
    b[0], b[5] = float("-inf"), float("inf")
    with cpu_backend(backend), torch.backends.mkldnn.flags(enabled=False):
        y = groupnorm.group_norm(x, 2, w, b, activation=activation)
        ref = unfused(x, 2, w, b, activation)
    assert torch.equal(y.isnan(), ref.isnan()), "NaN positions differ from torch"
    finite = ~ref.isnan()
    torch.testing.assert_close(y[finite].double(), ref[finite].double(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["silu", "gelu", "mish"])
def test_float32_and_bfloat16_close_to_unfused(backend, activation):
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        x = make_input((2, 8, 6, 6), dtype)
        w, b = make_params(8)
        scale, shift = 0.2 * torch.randn(2, 8), 0.2 * torch.randn(2, 8)
        with cpu_backend(backend):
            y = groupnorm.group_norm(x, 2, w, b, activation=activation, scale=scale, shift=shift)
        ref = unfused(x.double(), 2, w.double(), b.double(), activation, scale.double(), shift.double())
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_all_inputs(backend, activation):
    leaf = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
    x = leaf(make_input((2, 6, 3, 4), torch.float64))
    w, b = (leaf(t) for t in make_params(6, torch.float64))
    scale, shift = leaf(0.3 * torch.randn(2, 6, dtype=torch.float64)), leaf(0.3 * torch.randn(2, 6, dtype=torch.float64))
    if activation == "relu":  # keep pre-activations away from the kink at 0
        b = leaf(b + 3.0)
    fn = lambda *t: groupnorm.group_norm(t[0], 3, t[1], t[2], activation=activation, scale=t[3], shift=t[4])  # noqa: E731
    with cpu_backend(backend):
        assert torch.autograd.gradcheck(fn, (x, w, b, scale, shift), fast_mode=backend != "reference")


def test_gradients_match_unfused_float32():
    leaf = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
    x0 = make_input((3, 8, 5, 5))
    w0, b0 = make_params(8)
    s0, h0 = 0.3 * torch.randn(3, 8), 0.3 * torch.randn(3, 8)
    dy = torch.randn(x0.shape)
    grads = []
    for fused in (True, False):
        t = [leaf(v) for v in (x0, w0, b0, s0, h0)]
        if fused:
            y = groupnorm.group_norm(t[0], 4, t[1], t[2], activation="silu", scale=t[3], shift=t[4])
        else:
            y = unfused(t[0], 4, t[1], t[2], "silu", t[3], t[4])
        y.backward(dy)
        grads.append([v.grad for v in t])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_modules():
    x = make_input((2, 8, 5, 5))
    act = groupnorm.GroupNormAct(4, 8)
    with torch.no_grad():
        act.weight.normal_()
    torch.testing.assert_close(act(x), F.silu(F.group_norm(x, 4, act.weight, act.bias)))
    assert list(act.state_dict()) == ["weight", "bias"]
    ada = groupnorm.GroupNormScaleShift(4, 8, activation="silu")
    scale, shift = torch.randn(2, 8, 1, 1), torch.randn(2, 8)
    torch.testing.assert_close(ada(x, scale, shift), unfused(x, 4, None, None, "silu", scale.reshape(2, 8), shift))
    plain = groupnorm.GroupNorm(4, 8, activation="gelu_tanh")
    torch.testing.assert_close(plain(x), F.gelu(F.group_norm(x, 4, plain.weight, plain.bias), approximate="tanh"))
