"""GroupStats, group_stats, merge_stats and group_norm(stats=): statistics collected in parts
(uneven tiles, overlapping tiles with owned masks, many parts, empty parts) equal the whole
tensor's, and normalising any tile with them equals the matching slice of the whole."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

import groupnorm
from groupnorm import GroupStats, group_stats, merge_stats

REL = 1e-6


def rand(*shape, dtype=torch.float32, mean=-2.3, std=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (mean + std * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def truth(x: torch.Tensor, num_groups: int) -> GroupStats:
    """float64 statistics of the whole tensor (the oracle)."""
    xg = x.double().reshape(x.shape[0], num_groups, -1)
    mean = xg.mean(-1)
    m2 = (xg - mean[..., None]).square().sum(-1)
    return GroupStats(torch.full_like(mean, xg.shape[-1]), mean, m2)


def assert_stats_close(actual: GroupStats, expected: GroupStats, rel=REL):
    """Each field within `rel` relative (count exactly)."""
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.count.double(), expected.count.double(), rtol=0, atol=0)
    for field in ("mean", "m2"):
        a, e = getattr(actual, field).double(), getattr(expected, field).double()
        torch.testing.assert_close(a, e, rtol=rel, atol=0, msg=lambda m: f"{field}: {m}")


def grid(height, width, rows, cols):
    """Uneven tiles: (h-slice, w-slice) for the given row / column boundaries."""
    r = [0, *rows, height]
    c = [0, *cols, width]
    return [(slice(r[i], r[i + 1]), slice(c[j], c[j + 1])) for i in range(len(r) - 1) for j in range(len(c) - 1)]


def test_fields_dtype_and_shape():
    x = rand(3, 8, 5, 7)
    s = group_stats(x, 4)
    for t in (s.count, s.mean, s.m2):
        assert t.shape == (3, 4) and t.dtype == torch.float32
    assert (s.count == 2 * 35).all()
    assert_stats_close(s, truth(x, 4))
    torch.testing.assert_close(s.var, s.m2 / 70)
    torch.testing.assert_close(s.rstd(1e-3), torch.rsqrt(s.m2 / 70 + 1e-3))
    assert group_stats(x.double(), 4).mean.dtype == torch.float64


def test_uneven_tiles_merge_to_whole():
    x = rand(2, 12, 37, 29)
    tiles = grid(37, 29, rows=[5, 26], cols=[13])
    merged = merge_stats([group_stats(x[..., h, w], 3) for h, w in tiles])
    assert_stats_close(merged, truth(x, 3))


def test_overlapping_tiles_with_owned_masks():
    x = rand(2, 8, 40, 33, seed=1)
    parts = []
    for h, w in grid(40, 33, rows=[11, 30], cols=[17]):
        # Window = owned region plus a 3-pixel halo, clipped; only the owned region counts.
        t0, l0 = max(h.start - 3, 0), max(w.start - 3, 0)
        window = x[..., t0:min(h.stop + 3, 40), l0:min(w.stop + 3, 33)]
        mask = torch.zeros(window.shape[-2:], dtype=torch.bool)
        mask[h.start - t0:h.stop - t0, w.start - l0:w.stop - l0] = True
        parts.append(group_stats(window, 4, mask=mask))
    assert_stats_close(merge_stats(parts), truth(x, 4))


def test_mask_equals_selection():
    x = rand(2, 6, 9, 11, seed=2)
    mask = rand(9, 11, mean=0.0, std=1.0, seed=3) > 0.3  # scattered positions
    s = group_stats(x, 2, mask=mask)
    sel = x[..., mask].unsqueeze(-1)  # (N, C, K, 1): the selected positions only
    assert_stats_close(s, truth(sel, 2))


def test_mask_per_sample_and_5d_broadcast():
    x = rand(3, 4, 3, 5, 6, seed=4)
    mask = torch.zeros(3, 3, 5, 6, dtype=torch.bool)
    mask[0, :, :2] = True
    mask[1, 1:] = True
    mask[2] = True
    s = group_stats(x, 2, mask=mask)
    for n in range(3):
        one = GroupStats(*(t[n:n + 1] for t in (s.count, s.mean, s.m2)))
        assert_stats_close(one, truth(x[n:n + 1, :, mask[n]].unsqueeze(-1), 2))
    # A (H, W) mask broadcasts over D and N.
    hw = torch.zeros(5, 6, dtype=torch.bool)
    hw[1:4, 2:] = True
    assert_stats_close(group_stats(x, 2, mask=hw), truth(x[..., 1:4, 2:], 2))


def test_many_parts_and_empty_parts():
    x = rand(2, 4, 50, 3, seed=5)
    rows = [group_stats(x[:, :, i:i + 1], 2) for i in range(50)]  # 50 parts of 3 positions
    empty_mask = group_stats(x, 2, mask=torch.zeros(50, 3, dtype=torch.bool))
    empty_slice = group_stats(x[:, :, :0], 2)
    assert (empty_mask.count == 0).all() and (empty_slice.count == 0).all()
    parts = [empty_mask, *rows[:20], empty_slice, *rows[20:]]
    assert_stats_close(merge_stats(parts), truth(x, 2))
    assert_stats_close(merge_stats([empty_slice, empty_mask]), GroupStats(*(torch.zeros(2, 2),) * 3))
    # A count-0 part's mean and m2 are ignored, whatever they hold.
    junk = GroupStats(torch.zeros(2, 2), torch.full((2, 2), 1e30), torch.full((2, 2), float("nan")))
    assert_stats_close(merge_stats([junk, *rows]), truth(x, 2))


def test_large_mean_keeps_precision():
    # E[x^2] - E[x]^2 in float32 would lose every digit of the variance here (ulp(1e8) = 8).
    # What remains is the float32 rounding of each part's mean (ulp(1e4) ~ 1e-3 against a
    # std of 1), which the merge's delta^2 term inherits; float64 inputs remove even that.
    x = rand(2, 4, 64, 16, mean=1e4, std=1.0, seed=6)
    parts = [group_stats(x[..., i:i + 16, :], 2) for i in range(0, 64, 16)]
    assert_stats_close(merge_stats(parts), truth(x, 2), rel=1e-4)
    parts64 = [group_stats(x[..., i:i + 16, :].double(), 2) for i in range(0, 64, 16)]
    assert_stats_close(merge_stats(parts64), truth(x, 2), rel=1e-12)


def test_merge_is_deterministic_and_keeps_dtype():
    x = rand(1, 4, 20, 20, seed=7)
    parts = [group_stats(x[..., i:i + 7, :], 2) for i in range(0, 20, 7)]
    a, b = merge_stats(parts), merge_stats(tuple(parts))
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("count", "mean", "m2"))
    assert a.mean.dtype == torch.float32
    assert merge_stats([parts[0], parts[1].to(torch.float64)]).mean.dtype == torch.float64


@pytest.mark.parametrize("extras", [{}, {"activation": "silu", "fused": True}], ids=["plain", "silu_scale_shift"])
def test_group_norm_with_stats_equals_whole_on_every_tile(extras):
    x = rand(2, 8, 37, 29, seed=8)
    w, b = rand(8, mean=1.0, std=0.3, seed=9), rand(8, mean=0.1, std=0.5, seed=10)
    kw = {}
    if extras:
        kw = dict(activation="silu", scale=rand(2, 8, mean=0.0, std=0.2, seed=11),
                  shift=rand(2, 8, mean=0.0, std=0.5, seed=12))
    whole = groupnorm.group_norm(x, 4, w, b, 1e-5, **kw)
    tiles = grid(37, 29, rows=[10, 30], cols=[4])
    stats = merge_stats([group_stats(x[..., h, wd], 4) for h, wd in tiles])
    for h, wd in tiles:
        y = groupnorm.group_norm(x[..., h, wd], 4, w, b, 1e-5, stats=stats, **kw)
        torch.testing.assert_close(y, whole[..., h, wd], rtol=REL, atol=REL * whole.abs().max().item())
    if not extras:
        torch.testing.assert_close(whole, F.group_norm(x, 4, w, b), rtol=REL, atol=REL * 4)


def test_stats_of_whole_tensor_reproduce_group_norm():
    x = rand(2, 6, 4, 5, 3, seed=13).to(memory_format=torch.channels_last_3d)
    y = groupnorm.group_norm(x, 3, stats=group_stats(x, 3))
    torch.testing.assert_close(y, F.group_norm(x, 3), rtol=REL, atol=4 * REL)


def test_gradcheck_with_constant_stats():
    x = rand(2, 4, 3, 5, dtype=torch.float64, seed=14).requires_grad_()
    w = rand(4, dtype=torch.float64, mean=1.0, std=0.3, seed=15).requires_grad_()
    b = rand(4, dtype=torch.float64, mean=0.0, std=0.3, seed=16).requires_grad_()
    scale = rand(2, 4, dtype=torch.float64, mean=0.0, std=0.2, seed=17).requires_grad_()
    shift = rand(2, 4, dtype=torch.float64, mean=0.0, std=0.2, seed=18).requires_grad_()
    # Statistics of another tensor: they are constants, not functions of x.
    stats = group_stats(rand(2, 4, 6, 5, dtype=torch.float64, seed=19), 2)
    assert stats.mean.dtype == torch.float64

    def fn(x, w, b, scale, shift):
        return groupnorm.group_norm(x, 2, w, b, 1e-5, activation="silu", scale=scale, shift=shift, stats=stats)

    assert torch.autograd.gradcheck(fn, (x, w, b, scale, shift))


def test_detached_stats_are_constants():
    x = rand(2, 6, 7, 3, seed=20).requires_grad_()
    w = rand(6, mean=1.0, std=0.3, seed=21).requires_grad_()
    b = rand(6, mean=0.0, std=0.3, seed=22).requires_grad_()
    stats = group_stats(x, 3).detach()
    assert not stats.mean.requires_grad and not stats.m2.requires_grad
    dy = rand(2, 6, 7, 3, seed=23)
    grads = torch.autograd.grad((groupnorm.group_norm(x, 3, w, b, stats=stats) * dy).sum(), (x, w, b))
    mean, rstd = stats.mean[:, :, None], stats.rstd(1e-5)[:, :, None]
    xhat = ((x.reshape(2, 3, -1) - mean) * rstd).reshape(x.shape)
    expected = torch.autograd.grad(((xhat * w[:, None, None] + b[:, None, None]) * dy).sum(), (x, w, b))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


# --- statistics that carry gradients ----------------------------------------------------

def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _torch_whole(x, groups, w, b, scale=None, shift=None, activation=None):
    """torch's own composition on the whole tensor: F.group_norm, modulation, activation."""
    y = F.group_norm(x, groups, w, b, 1e-5)
    if scale is not None:
        extra = (1,) * (x.dim() - 2)
        y = y * (1 + scale.reshape(*scale.shape, *extra)) + shift.reshape(*shift.shape, *extra)
    return F.silu(y) if activation == "silu" else y


def _tiled(x, groups, w, b, tiles, scale=None, shift=None, activation=None):
    """Tiled training: statistics merged over the tiles, each tile normalised with them,
    the tiles put back together (tiles: a grid of (h-slice, w-slice) pairs, as ``grid``)."""
    stats = merge_stats([group_stats(x[..., h, wd], groups) for h, wd in tiles])
    bands = {}
    for h, wd in tiles:   # grid order: row by row, left to right
        y = groupnorm.group_norm(x[..., h, wd], groups, w, b, 1e-5, stats=stats, activation=activation,
                                 scale=scale, shift=shift)
        bands.setdefault(h.start, []).append(y)
    return torch.cat([torch.cat(band, dim=-1) for band in bands.values()], dim=-2)


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "silu_scale_shift"])
def test_tiled_training_gradients_equal_whole(extras):
    """float64: every gradient of the tiled pipeline equals F.group_norm's on the whole
    (before, the statistics were constants to autograd and dx was off by ~8%)."""
    x, w, b = _leaves(rand(2, 8, 13, 11, dtype=torch.float64, seed=30),
                      rand(8, dtype=torch.float64, mean=1.0, std=0.3, seed=31),
                      rand(8, dtype=torch.float64, mean=0.1, std=0.5, seed=32))
    kw = {}
    if extras:
        scale, shift = _leaves(rand(2, 8, dtype=torch.float64, mean=0.0, std=0.2, seed=33),
                               rand(2, 8, dtype=torch.float64, mean=0.0, std=0.5, seed=34))
        kw = dict(scale=scale, shift=shift, activation="silu")
    dy = rand(2, 8, 13, 11, dtype=torch.float64, mean=0.3, std=1.0, seed=35)
    tiles = grid(13, 11, rows=[4, 9], cols=[5])
    inputs = [x, w, b, *(kw[k] for k in ("scale", "shift") if k in kw)]
    y = _tiled(x, 4, w, b, tiles, **kw)
    got = torch.autograd.grad((y * dy).sum(), inputs)
    ref = _torch_whole(x, 4, w, b, **kw)
    want = torch.autograd.grad((ref * dy).sum(), inputs)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for name, g, e in zip(["x", "weight", "bias", "scale", "shift"], got, want):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=lambda m: f"d{name}: {m}")


def test_stats_of_the_whole_tensor_give_torchs_gradients_float32():
    x, w, b = _leaves(rand(2, 6, 9, 8, seed=36), rand(6, mean=1.0, std=0.3, seed=37),
                      rand(6, mean=0.0, std=0.3, seed=38))
    x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    dy = rand(2, 6, 9, 8, mean=0.2, std=1.0, seed=39)
    y = groupnorm.group_norm(x, 3, w, b, stats=group_stats(x, 3))
    got = torch.autograd.grad((y * dy).sum(), (x, w, b))
    want = torch.autograd.grad((F.group_norm(x, 3, w, b) * dy).sum(), (x, w, b))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=2e-5 * e.abs().max().item())


def test_overlapping_windows_with_owned_masks_train_like_the_whole():
    """Windows with a halo, statistics over the owned region only, each window's owned
    part kept: the result and its gradients are the whole tensor's."""
    x, w, b = _leaves(rand(2, 4, 12, 10, dtype=torch.float64, seed=40),
                      rand(4, dtype=torch.float64, mean=1.0, std=0.3, seed=41),
                      rand(4, dtype=torch.float64, mean=0.0, std=0.3, seed=42))
    dy = rand(2, 4, 12, 10, dtype=torch.float64, mean=0.1, std=1.0, seed=43)
    owned = [slice(0, 5), slice(5, 12)]
    windows = [slice(max(o.start - 2, 0), min(o.stop + 2, 12)) for o in owned]
    parts = []
    for o, win in zip(owned, windows):
        mask = torch.zeros(win.stop - win.start, 10, dtype=torch.bool)
        mask[o.start - win.start:o.stop - win.start] = True
        parts.append(group_stats(x[..., win, :], 2, mask=mask))
    stats = merge_stats(parts)
    pieces = [groupnorm.group_norm(x[..., win, :], 2, w, b, stats=stats)[..., o.start - win.start:o.stop - win.start, :]
              for o, win in zip(owned, windows)]
    y = torch.cat(pieces, dim=-2)
    got = torch.autograd.grad((y * dy).sum(), (x, w, b))
    ref = F.group_norm(x, 2, w, b)
    want = torch.autograd.grad((ref * dy).sum(), (x, w, b))
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_gradcheck_tiled_pipeline():
    x, w, b, scale, shift = _leaves(rand(2, 4, 5, 3, dtype=torch.float64, seed=44),
                                    rand(4, dtype=torch.float64, mean=1.0, std=0.3, seed=45),
                                    rand(4, dtype=torch.float64, mean=0.0, std=0.3, seed=46),
                                    rand(2, 4, dtype=torch.float64, mean=0.0, std=0.2, seed=47),
                                    rand(2, 4, dtype=torch.float64, mean=0.0, std=0.2, seed=48))
    tiles = grid(5, 3, rows=[2], cols=[1])

    def fn(x, w, b, scale, shift):
        return _tiled(x, 2, w, b, tiles, scale=scale, shift=shift, activation="silu")

    assert torch.autograd.gradcheck(fn, (x, w, b, scale, shift))


def test_gradcheck_and_gradgradcheck_of_the_statistics():
    x = _leaves(rand(2, 6, 4, 3, dtype=torch.float64, seed=49))[0]
    mask = rand(4, 3, mean=0.0, std=1.0, seed=50) > -0.3

    def fields(x):
        s = merge_stats([group_stats(x[..., :1, :], 3), group_stats(x[..., 1:, :], 3, mask=mask[1:])])
        return s.mean, s.m2, s.rstd(1e-3)

    assert torch.autograd.gradcheck(fields, (x,))
    assert torch.autograd.gradgradcheck(lambda x: group_stats(x, 3).m2, (x,))


def test_statistics_carry_gradients_only_when_asked():
    x = rand(2, 4, 5, 6, seed=51)
    assert group_stats(x, 2).mean.grad_fn is None   # nothing needs a gradient: the kernel alone
    tracked = x.clone().requires_grad_()
    s = group_stats(tracked, 2)
    assert s.mean.grad_fn is not None and s.m2.grad_fn is not None and not s.count.requires_grad
    with torch.no_grad():
        assert group_stats(tracked, 2).mean.grad_fn is None
    assert s.detach().mean.grad_fn is None
    # sum(xhat) is 0 for every group whatever x is: with the statistics tracked its
    # gradient vanishes; held constant, each element's gradient is its group's rstd.
    dx, = torch.autograd.grad(groupnorm.group_norm(tracked, 2, stats=s).sum(), tracked)
    torch.testing.assert_close(dx, torch.zeros_like(dx), rtol=0, atol=1e-5)
    dx, = torch.autograd.grad(groupnorm.group_norm(tracked, 2, stats=s.detach()).sum(), tracked)
    expected = s.rstd().detach().repeat_interleave(2, dim=1)[:, :, None, None].expand_as(dx)
    torch.testing.assert_close(dx, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_tiled_training_on_other_backends(backend):
    """The same tiled training through the reference and the Triton backend (interpreted)."""
    from helpers import cpu_backend

    x, w, b = _leaves(rand(2, 4, 6, 5, seed=52), rand(4, mean=1.0, std=0.3, seed=53),
                      rand(4, mean=0.0, std=0.3, seed=54))
    dy = rand(2, 4, 6, 5, mean=0.2, std=1.0, seed=55)
    with cpu_backend(backend):
        y = _tiled(x, 2, w, b, grid(6, 5, rows=[2], cols=[3]))
        got = torch.autograd.grad((y * dy).sum(), (x, w, b))
    want = torch.autograd.grad((F.group_norm(x, 2, w, b) * dy).sum(), (x, w, b))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=2e-5 * e.abs().max().item())


def test_errors():
    x = rand(2, 8, 4, 4)
    s = group_stats(x, 4)
    with pytest.raises(ValueError, match="empty"):
        merge_stats([])
    with pytest.raises(ValueError, match="shape"):
        merge_stats([s, group_stats(x, 2)])
    with pytest.raises(TypeError, match="GroupStats"):
        merge_stats([s, (s.count, s.mean, s.m2)])
    with pytest.raises(ValueError, match="count, mean and m2"):
        merge_stats([GroupStats(s.count, s.mean, s.m2[:1])])
    with pytest.raises(ValueError, match=r"\(N, G\)"):
        groupnorm.group_norm(x, 2, stats=s)
    with pytest.raises(ValueError, match=r"\(N, G\)"):
        groupnorm.group_norm(x[:1], 4, stats=s)
    with pytest.raises(TypeError, match="GroupStats"):
        groupnorm.group_norm(x, 4, stats=(s.count, s.mean, s.m2))
    with pytest.raises(ValueError, match="bool"):
        group_stats(x, 4, mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match="broadcast"):
        group_stats(x, 4, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="divisible"):
        group_stats(x, 3)


def _load_example():
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "tiled_vae_block.py"
    spec = importlib.util.spec_from_file_location("tiled_vae_block", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    return module


def test_tiled_vae_block_example():
    result = _load_example().main(size=72, channels=64, tile=30, verbose=False)
    assert result["exact_error"] <= 1e-5
    assert result["naive_error"] > 1e-2  # the seams the merged statistics remove
