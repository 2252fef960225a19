"""Property-based differential test: random shapes, groups, dtypes, layouts, eps, affine or
not, offsets and NaN / Inf placements, judged against float64 by torch's own error on the
same inputs (differential.judge).

Profiles: the default run draws a few hundred cases on the Numba backend and a few dozen
on the Triton backend in interpreter mode; ``-m slow`` draws 10,000 (``HYPOTHESIS_PROFILE``
picks another registered profile).
"""
from __future__ import annotations

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import groupnorm  # noqa: E402
from differential import judge  # noqa: E402
from helpers import cpu_backend  # noqa: E402

COMMON = dict(deadline=None, derandomize=True, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("default-run", max_examples=300, **COMMON)
settings.register_profile("interpreter", max_examples=30, **COMMON)
settings.register_profile("slow", max_examples=10_000, **COMMON)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MAX_ELEMENTS = 1 << 16


@st.composite
def cases(draw, max_elements=MAX_ELEMENTS):
    """(x, groups, weight, bias, eps, dy): one random call."""
    dtype = draw(st.sampled_from(DTYPES))
    spatial = tuple(draw(st.lists(st.integers(1, 9), min_size=0, max_size=3)))
    groups = draw(st.sampled_from([1, 2, 3, 4, 8, 16, 32]))
    cpg = draw(st.sampled_from([1, 1, 2, 3, 4, 8, 16]))
    channels = groups * cpg
    hw = 1
    for s in spatial:
        hw *= s
    n_max = max(0, min(64, max_elements // (channels * hw)))
    n = draw(st.integers(0, n_max)) if n_max else 0
    shape = (n, channels) + spatial
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    offset = draw(st.sampled_from([0.0, 1.0, -3.0, 1e2, 1e3, -1e4]))
    spread = draw(st.sampled_from([1.0, 1e-2, 1e-4, 1e2, 0.0]))
    x64 = offset + spread * torch.randn(shape, generator=gen, dtype=torch.float64)
    if dtype == torch.float16:
        x64 = x64.clamp(-6e4, 6e4)
    special = draw(st.sampled_from(["none", "none", "none", "nan", "inf", "-inf"]))
    if special != "none" and x64.numel():
        flat = x64.view(-1)
        flat[draw(st.integers(0, flat.numel() - 1))] = float(special)
    x = x64.to(dtype)
    layout = draw(st.sampled_from(["contiguous", "channels_last", "strided"]))
    if layout == "channels_last" and x.dim() in (4, 5):
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    elif layout == "strided" and x.dim() >= 2:
        wide = torch.empty(shape[:-1] + (2 * shape[-1],), dtype=dtype)
        wide[..., ::2] = x
        x = wide[..., ::2]
    affine = draw(st.sampled_from(["none", "weight", "both"]))
    weight = bias = None
    if affine != "none":
        weight = (1 + 0.5 * torch.randn(channels, generator=gen, dtype=torch.float64)).to(dtype)
    if affine == "both":
        bias = torch.randn(channels, generator=gen, dtype=torch.float64).to(dtype)
    eps = draw(st.sampled_from([1e-5, 1e-6, 1e-3, 0.0, 1e-12]))
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return x, groups, weight, bias, eps, dy


def _profile(default: str) -> str:
    return os.environ.get("HYPOTHESIS_PROFILE", default)


@settings(settings.get_profile(_profile("default-run")))
@given(cases())
def test_numba_matches_float64_as_well_as_torch(case):
    with cpu_backend("numba"):
        judge(*case, fn=groupnorm.group_norm)


@pytest.mark.slow
@settings(settings.get_profile("slow"))
@given(cases())
def test_numba_matches_float64_as_well_as_torch_many(case):
    with cpu_backend("numba"):
        judge(*case, fn=groupnorm.group_norm)


@settings(settings.get_profile(_profile("interpreter")))
@given(cases(max_elements=1 << 12))
def test_triton_interpreter_matches_float64_as_well_as_torch(case):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the interpreter runs where no GPU is (conftest)")
    with cpu_backend("triton"):
        judge(*case, fn=groupnorm.group_norm)
