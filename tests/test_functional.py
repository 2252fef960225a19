"""group_norm against torch and the float64 reference, on every available CPU backend."""
import pytest
import torch
import torch.nn.functional as F

import groupnorm
from helpers import DTYPES, assert_oracle_close, available_cpu_backends, cpu_backend, make_input, make_params, oracle

BACKENDS = available_cpu_backends()

# (shape, num_groups): odd sizes, C/G in {1, 3, 5, 16}, no spatial dims, 1-D, 2-D, 3-D.
SHAPES = [
    ((2, 6), 2),              # no spatial dims, C/G = 3
    ((3, 5, 17), 1),          # 1-D, C/G = 5
    ((2, 15, 17, 23), 3),     # 2-D odd sizes, C/G = 5
    ((2, 16, 3, 5, 4), 1),    # 3-D, C/G = 16
    ((1, 6, 9, 4), 6),        # C/G = 1 (instance norm)
    ((3, 9, 4, 7), 3),        # C/G = 3
]


def _torch_group_norm(x, g, w, b, eps=1e-5):
    # torch's own result in the input dtype (its CPU kernel wants float32 params for half x).
    return F.group_norm(x, g, w, b, eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_and_float64_reference(backend, shape, groups, dtype):
    if backend == "triton" and dtype != torch.float32 and len(shape) > 3:
        pytest.skip("interpreter time: triton dtypes are covered in test_triton_backend")
    x = make_input(shape, dtype)
    w, b = make_params(shape[1], dtype if dtype in (torch.float32, torch.float64) else torch.float32)
    with cpu_backend(backend):
        y = groupnorm.group_norm(x, groups, w, b)
    assert_oracle_close(y, _torch_group_norm(x, groups, w, b), oracle(x, groups, w, b), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,groups", [((2, 15, 17, 23), 3), ((2, 16, 3, 5, 4), 4), ((3, 6, 11), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_in_channels_last_out(backend, shape, groups, dtype):
    x = make_input(shape, dtype, channels_last=True)
    w, b = make_params(shape[1])
    with cpu_backend(backend):
        y = groupnorm.group_norm(x, groups, w, b)
    peer = _torch_group_norm(x, groups, w, b)
    # torch's CPU layout: channels-last stays channels-last (4-D, 5-D); a 3-D (N, L, C)-dense
    # input comes back contiguous.
    assert y.stride() == F.group_norm(x.float(), groups, w, b).stride(), "output must have torch's layout"
    assert y.stride() == (x.stride() if x.dim() > 3 else x.contiguous().stride())
    assert_oracle_close(y, peer, oracle(x, groups, w, b), dtype)


def test_non_contiguous_input():
    base = make_input((4, 12, 10, 9))
    x = base[::2, :, 1:8:2, :]  # neither contiguous nor channels-last
    w, b = make_params(12)
    y = groupnorm.group_norm(x, 4, w, b)
    torch.testing.assert_close(y, F.group_norm(x, 4, w, b))


def test_no_affine_and_weight_only():
    x = make_input((2, 8, 5, 5))
    w, _ = make_params(8)
    torch.testing.assert_close(groupnorm.group_norm(x, 4), F.group_norm(x, 4))
    torch.testing.assert_close(groupnorm.group_norm(x, 4, w), F.group_norm(x, 4, w))


def test_eps_inside_square_root():
    x = make_input((2, 4, 3), std=1e-2)
    for eps in (1e-5, 1e-2, 1.0):
        y = groupnorm.group_norm(x, 2, eps=eps)
        assert_oracle_close(y, F.group_norm(x, 2, eps=eps), oracle(x, 2, eps=eps), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_is_stable(backend):
    x = (1e4 + 1e-2 * torch.randn(2, 8, 32, 32, dtype=torch.float64)).float()
    with cpu_backend(backend):
        y = groupnorm.group_norm(x, 2, eps=1e-9)  # eps small against var = 1e-4
    std = y.double().reshape(2, 2, -1).std(dim=-1, unbiased=False)
    assert (std - 1).abs().max().item() < 1e-3, std


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_parameter_dtype(backend):
    x = make_input((2, 6, 7, 5), torch.bfloat16)
    w, b = make_params(6, torch.float32)
    with cpu_backend(backend):
        y = groupnorm.group_norm(x, 3, w, b)
    assert y.dtype == torch.bfloat16
    assert_oracle_close(y, F.group_norm(x, 3, w, b), oracle(x, 3, w, b), torch.bfloat16)


@pytest.mark.parametrize("shape", [(0, 6, 3), (0, 6), (2, 6, 0), (0, 6, 4, 4)])
def test_empty_inputs(shape):
    x = torch.randn(shape, requires_grad=True)
    w = torch.ones(6, requires_grad=True)
    y = groupnorm.group_norm(x, 3, w)
    assert y.shape == F.group_norm(x, 3, w).shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros(6))


def test_outputs_are_fresh_every_call():
    x = make_input((2, 6, 5))
    y1 = groupnorm.group_norm(x, 3)
    y2 = groupnorm.group_norm(x, 3)
    assert y1.data_ptr() != y2.data_ptr() and torch.equal(y1, y2)


def test_is_channels_last_agrees_with_the_movedim_view():
    """The cheap check (memory_format for 4-D / 5-D) must say exactly what the kernels rely
    on, movedim(1, -1).is_contiguous(), also where size-1 dims make strides ambiguous."""
    from groupnorm.functional import is_channels_last

    shapes = [(2, 6, 5, 7), (1, 6, 5, 7), (2, 1, 5, 7), (2, 6, 1, 7), (2, 6, 5, 1), (1, 1, 1, 1),
              (2, 6, 3, 4, 5), (1, 6, 1, 4, 1), (2, 6, 7), (3, 6)]
    for shape in shapes:
        base = torch.randn(shape)
        candidates = [base, base.movedim(1, -1).contiguous().movedim(-1, 1), base.transpose(-1, -2),
                      base[..., ::2] if base.shape[-1] > 1 else base]
        if base.dim() == 4:
            candidates.append(base.contiguous(memory_format=torch.channels_last))
        for t in candidates:
            assert is_channels_last(t) == t.movedim(1, -1).is_contiguous(), (shape, t.stride())
