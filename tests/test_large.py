"""Tensors over 2^31 elements: int64 indexing end to end (slow: run with `-m slow`)."""
import pytest
import torch

import groupnorm

BIG = 2**31 + 2 * 4099  # elements: past the int32 range


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_backward_past_int32_indexing(device):
    # bfloat16 keeps it to 4 GiB per tensor. Two groups of ~2^30 elements each; the second
    # group lives entirely past element 2^31, where an int32 offset would wrap.
    n, c = 1, 2
    hw = BIG // (n * c)
    gen = torch.Generator().manual_seed(0)
    x = torch.empty(n, c, hw, dtype=torch.bfloat16, device=device)
    chunk = 1 << 26
    for g in range(c):  # different mean/std per group, filled in chunks to bound memory
        for start in range(0, hw, chunk):
            stop = min(hw, start + chunk)
            x[0, g, start:stop] = (3.0 * g - 1.0 + (0.5 + g) * torch.randn(stop - start, generator=gen)).bfloat16().to(device)
    w = torch.tensor([1.5, -0.5], device=device)
    b = torch.tensor([0.25, 2.0], device=device)
    y = groupnorm.group_norm(x, 2, w, b)
    for g in range(c):
        # float64 statistics of the group, in chunks, then spot checks at the far end of memory.
        total = sq = 0.0
        for start in range(0, hw, chunk):
            part = x[0, g, start:start + chunk].double()
            total += part.sum().item()
        mean = total / hw
        for start in range(0, hw, chunk):
            sq += (x[0, g, start:start + chunk].double() - mean).square().sum().item()
        rstd = (sq / hw + 1e-5) ** -0.5
        for idx in (0, hw // 2, hw - 1, hw - 4097):
            expected = (x[0, g, idx].double().item() - mean) * rstd * w[g].item() + b[g].item()
            assert abs(y[0, g, idx].double().item() - expected) <= 2e-2 * (1 + abs(expected)), (g, idx)
    # Backward through the same indexing: dx of a sum of y is ~0, dweight = sum(xhat) ~ 0,
    # dbias = count; any wrapped offset would leave garbage or NaN.
    del y
    xr = x.requires_grad_(True)
    wr, br = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    dy = torch.ones_like(x)
    (dx, dw, db) = torch.autograd.grad(groupnorm.group_norm(xr, 2, wr, br), (xr, wr, br), dy)
    assert torch.allclose(db, torch.full((2,), float(hw), device=device), rtol=1e-4)
    assert dw.abs().max().item() < 1e-3 * hw
    assert not torch.isnan(dx[0, 1, -4096:].float()).any()
    assert dx[0, 1, -4096:].float().abs().max().item() < 0.1
