"""The vectorised float32 activations of the Numba epilogue (activations.py) against the
float64 scalar ones (libm), and against torch's own float32 activations.

The float64 ``activate_block``/``grad_block`` path calls the scalar ``activate``/
``activate_grad`` per element, so a float64 buffer run through it is the reference.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("numba")
from groupnorm.backends.numba_cpu import activations as act  # noqa: E402

VECTORISED = ("gelu", "gelu_tanh", "mish")
TORCH_FORWARD = {
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "mish": F.mish,
}
SPECIAL = [0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 1e-30, -1e-30, 1e-7, -1e-7, 19.999998, 20.0,
           20.000002, -20.0, 87.5, -87.5, 88.0, -88.0, 100.0, -100.0, 1e4, -1e4, 1e6, -1e6,
           3e38, -3e38]

# Measured maxima (this machine, AVX2 + FMA) of err / max(1, |truth|): 1.2e-7 .. 1.7e-7
# (about 1.5 float32 ulps of 1), except GELU's forward: 7.3e-7 near z = -5, where its
# rational erf's ~3.8e-7 error is all that is left of 1 + erf. The forward's err / |z|
# (the error of act(z) / z, torch's own is 2.2e-7 for GELU): 1.2e-7 .. 2.0e-7; <= 2.5
# ulps for z > 0. The bounds leave ~1.5-2x room for other CPUs (with or without FMA
# contraction) but catch a coefficient off in its 5th-6th digit: erf's P1 * (1 + 1e-5)
# gives 4.1e-6 (1.4e-6 over |z|), erfc's R_P1 * (1 + 1e-5) 9.7e-7 (gradient), the
# GELU-tanh cubic * (1 + 1e-5) 5.8e-7 (gradient), mish's 4 * (1 + 1e-5) 2.7e-6
# (gradient), exp's 1/3! * (1 + 1e-4) 7.7 ulps.
BOUND_REL_OR_ABS = 3e-7
BOUND_REL_OR_ABS_GELU_FORWARD = 1.2e-6
BOUND_OVER_Z = 3e-7
BOUND_ULPS_POSITIVE = 4.0

def grid():
    dense = np.linspace(-30.0, 30.0, 200_001)
    noise = np.random.default_rng(0).normal(0.0, 4.0, 50_000)
    return np.concatenate([dense, noise, SPECIAL]).astype(np.float32)


def run(block, name, z, dtype):
    buf = z.astype(dtype)
    block(buf, buf.size, act.CODES[name])
    return buf.astype(np.float64)


def errors(name, block):
    z = grid()
    got = run(block, name, z, np.float32)
    want = run(block, name, z, np.float64)
    assert np.isfinite(got).all() and np.isfinite(want).all()
    return z.astype(np.float64), got, want, np.abs(got - want)


@pytest.mark.parametrize("name", VECTORISED)
@pytest.mark.parametrize("block", [act.activate_block, act.grad_block], ids=["forward", "grad"])
def test_float32_within_bounds_of_float64(name, block):
    z, got, want, err = errors(name, block)
    rel_or_abs = err / np.maximum(1.0, np.abs(want))
    gelu_forward = name == "gelu" and block is act.activate_block
    bound = BOUND_REL_OR_ABS_GELU_FORWARD if gelu_forward else BOUND_REL_OR_ABS
    assert rel_or_abs.max() <= bound, (rel_or_abs.max(), z[rel_or_abs.argmax()])
    if block is act.activate_block:
        # act(z) = z * g(z): what matters for a tiny output is the error of g, i.e. err / |z|
        # (the float32 rounding of a subnormal result is not the kernel's error).
        normal = np.abs(z) >= np.finfo(np.float32).tiny
        over_z = err[normal] / np.abs(z[normal])
        assert over_z.max() <= BOUND_OVER_Z, (over_z.max(), z[normal][over_z.argmax()])
        # Away from the small negative tail, a few ulps of the result itself.
        positive = z >= np.finfo(np.float32).tiny
        ulps = err[positive] / np.spacing(np.abs(want[positive]).astype(np.float32))
        assert ulps.max() <= BOUND_ULPS_POSITIVE, (ulps.max(), z[positive][ulps.argmax()])


def tail_reference(name, z):
    """Forward values in float64 with formulas that keep relative accuracy for z < 0
    (activate's 1 + tanh cancels there), and the size of the exp argument."""
    if name == "gelu_tanh":
        two_u = 2.0 * math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)
        return [v / (1.0 + math.exp(-t)) for v, t in zip(z, two_u)], np.abs(two_u)
    return [v * math.tanh(math.log1p(math.exp(v))) for v in z], np.abs(z)


@pytest.mark.parametrize("name", ["gelu_tanh", "mish"])
def test_float32_forward_negative_tail_is_relatively_accurate(name):
    """For z < 0 the outputs are tiny; GELU-tanh (as z sigmoid(2u)) and Mish keep relative
    accuracy there, limited only by the float32 rounding of the exp argument:
    err / |truth| <= 3 eps (1 + |arg|) (measured <= 1.4 eps (1 + |arg|)). (GELU's forward
    is only absolutely accurate there: 1 + erf cancels, as in torch.)"""
    z = np.linspace(-12.0, -0.01, 100_001).astype(np.float32)
    want, arg = tail_reference(name, z.astype(np.float64))
    want = np.asarray(want)
    got = run(act.activate_block, name, z, np.float32)
    normal = np.abs(want) >= 1e-30
    scaled = np.abs(got - want)[normal] / (np.abs(want[normal]) * (1.0 + arg[normal]))
    eps = float(np.finfo(np.float32).eps)
    assert scaled.max() <= 3.0 * eps, (scaled.max() / eps, z[normal][scaled.argmax()])

@pytest.mark.parametrize("name", VECTORISED)
def test_float32_forward_no_worse_than_torch(name):
    """Our max error vs float64 truth <= 2x torch's float32 max error + 1e-6."""
    z = np.linspace(-30.0, 30.0, 200_001).astype(np.float32)
    want = run(act.activate_block, name, z, np.float64)
    ours = run(act.activate_block, name, z, np.float32)
    theirs = TORCH_FORWARD[name](torch.from_numpy(z)).double().numpy()
    scale = np.maximum(1.0, np.abs(want))
    ours_err = (np.abs(ours - want) / scale).max()
    torch_err = (np.abs(theirs - want) / scale).max()
    assert ours_err <= 2.0 * torch_err + 1e-6, (ours_err, torch_err)


@pytest.mark.parametrize("name", VECTORISED)
def test_float32_limits_and_nan_as_torch(name):
    """At +-inf and NaN the value and the derivative are torch's, NaN for NaN (gelu(-inf)
    is -inf * 0 = NaN in torch, and every derivative there is NaN)."""
    z = np.array([np.inf, -np.inf, np.nan], np.float32)
    y = z.copy()
    act.activate_block(y, 3, act.CODES[name])
    g = z.copy()
    act.grad_block(g, 3, act.CODES[name])
    zt = torch.from_numpy(z.copy()).requires_grad_(True)
    # ATen's own kernels: on AVX-512 CPUs torch hands float32 GELU to oneDNN, whose
    # gelu(+inf) is NaN (ATen's and the math's: +inf), so torch itself answers per machine.
    with torch.backends.mkldnn.flags(enabled=False):
        yt = TORCH_FORWARD[name](zt)
        (gt,) = torch.autograd.grad(yt.sum(), zt)
    np.testing.assert_array_equal(y, yt.detach().numpy())   # NaN positions must agree too
    np.testing.assert_array_equal(g, gt.numpy())


@pytest.mark.parametrize("name", VECTORISED)
@pytest.mark.parametrize("block", [act.activate_block, act.grad_block], ids=["forward", "grad"])
def test_float32_large_arguments_give_exact_limits(name, block):
    """Past the saturation points the result is exactly z (forward) or 1 (grad), or 0."""
    up = np.array([30.0, 100.0, 1e6, 3e38], np.float32)
    down = np.array([-100.0, -1e6, -3e38], np.float32)   # mish(-30) is still -2.8e-12
    y_up, y_down = up.copy(), down.copy()
    block(y_up, up.size, act.CODES[name])
    block(y_down, down.size, act.CODES[name])
    assert np.array_equal(y_up, up if block is act.activate_block else np.ones_like(up))
    assert np.array_equal(y_down, np.zeros_like(down))


@pytest.mark.parametrize("name", VECTORISED)
@pytest.mark.parametrize("block", [act.activate_block, act.grad_block], ids=["forward", "grad"])
def test_only_count_elements_are_written(name, block):
    buf = np.full(40, 0.75, np.float32)
    block(buf, 17, act.CODES[name])
    assert (buf[:17] != 0.75).all() and (buf[17:] == 0.75).all()
    block(buf, 0, act.CODES[name])
    assert (buf[17:] == 0.75).all()


@pytest.mark.parametrize("name", VECTORISED)
def test_float64_buffers_keep_the_scalar_libm_path(name):
    """float64 staging keeps activate/activate_grad per element: float64-accurate, not the
    float32 approximations (~1e-7). Not bitwise: a block compiled inside a kernel inherits
    the kernel's fastmath ("contract"), so its cache entry may differ in the last ulp."""
    code = act.CODES[name]
    z = np.random.default_rng(1).normal(0.0, 4.0, 300)
    y, g = z.copy(), z.copy()
    act.activate_block(y, z.size, code)
    act.grad_block(g, z.size, code)
    np.testing.assert_allclose(y, [act.activate(v, code) for v in z], rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(g, [act.activate_grad(v, code) for v in z], rtol=1e-14, atol=1e-15)


def test_silu_float32_block_matches_float64_and_torch_at_extremes():
    """SiLU's float32 block: the float64 path on the grid, and torch's own limits where exp
    overflows (silu(-3e38) = -0, silu(-inf) = NaN; its gradient 0 and NaN there)."""
    z, got, want, err = errors("silu", act.activate_block)
    assert (err / np.maximum(1.0, np.abs(want))).max() < BOUND_REL_OR_ABS
    _, gg, gw, gerr = errors("silu", act.grad_block)
    assert (gerr / np.maximum(1.0, np.abs(gw))).max() < BOUND_REL_OR_ABS
    edge = np.array([-np.inf, -3e38, -1e6, -89.0, -88.5, 88.5, 3e38, np.inf, np.nan], np.float32)
    t = torch.from_numpy(edge.copy()).requires_grad_()
    y = F.silu(t)
    (g,) = torch.autograd.grad(y.sum(), t)
    buf = edge.copy()
    act.activate_block(buf, buf.size, act.SILU)
    want = y.detach().numpy()
    assert np.array_equal(np.isnan(buf), np.isnan(want))
    # exp's range ends at 88 here, torch's at 88.72: below -88, 0 against ~1e-37 at most
    np.testing.assert_allclose(buf[~np.isnan(buf)], want[~np.isnan(buf)], rtol=1e-6, atol=1e-30)
    buf = edge.copy()
    act.grad_block(buf, buf.size, act.SILU)
    assert np.array_equal(np.isnan(buf), np.isnan(g.numpy()))
    np.testing.assert_allclose(buf[~np.isnan(buf)], g.numpy()[~np.isnan(buf)], atol=1e-30)
