"""Differential judge: our group_norm against a float64 evaluation of the same inputs,
with torch's own error on those inputs as the yardstick (test_fuzz, test_reliability).

A case passes when, for y and every gradient:
* non-finite values sit in the same groups (channels, for dweight / dbias) as torch's,
  except that we may be finite where only torch overflowed (the float64 result is finite),
  or overflow where the float64 result is beyond the dtype's range and torch's is not,
  and groups whose result is 0 / 0 (a constant group with eps = 0: torch's rounding
  makes it finite garbage, an exact variance makes it NaN) are not judged;
* elsewhere our largest error against float64 is at most twice torch's plus a slack of a
  few rounding errors of the dtype, scaled by how much the inputs amplify them
  (|x| * rstd: a large offset makes x - mean lose digits in any algorithm).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import groupnorm

SLACK_ULPS = 64


def evaluate(fn, x, groups, weight, bias, eps, dy):
    """(y, dx, dweight, dbias) of fn on copies of the inputs (None for absent ones), or
    the exception it raised."""
    xs = x.detach().clone().requires_grad_()
    if x.stride() != xs.stride():   # clone keeps dense layouts; keep strided ones strided
        xs = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).copy_(x).requires_grad_()
    ws = None if weight is None else weight.detach().clone().requires_grad_()
    bs = None if bias is None else bias.detach().clone().requires_grad_()
    try:
        y = fn(xs, groups, ws, bs, eps)
    except (ValueError, RuntimeError, TypeError) as error:
        return error
    inputs = [t for t in (xs, ws, bs) if t is not None]
    grads = list(torch.autograd.grad(y, inputs, dy.to(y.dtype))) if y.numel() else [torch.zeros_like(t)
                                                                                     for t in inputs]
    dx = grads.pop(0)
    dw = grads.pop(0) if ws is not None else None
    db = grads.pop(0) if bs is not None else None
    return y.detach(), dx, dw, db


def two_pass_group_norm(x, groups, weight=None, bias=None, eps=1e-5):
    """GroupNorm as differentiable float64 torch ops, two-pass: the mean, then the mean of
    squared deviations (no E[x^2] - E[x]^2). ATen's own float64 kernel is not this careful:
    on a two-element group 1 +- 1e-4 it is off by 2e-9 (exact: +-1)."""
    n = x.shape[0]
    xg = x.reshape(n, groups, -1) if x.numel() else x.reshape(n, groups, grouped(x, groups).shape[-1])
    mean = xg.mean(-1, keepdim=True)
    centred = xg - mean
    var = (centred * centred).mean(-1, keepdim=True)
    y = (centred * torch.rsqrt(var + eps)).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def float64_reference(x, groups, weight, bias, eps, dy):
    """The same computation in float64 on contiguous copies, by two_pass_group_norm."""
    up = lambda t: None if t is None else t.detach().to(torch.float64).contiguous()   # noqa: E731
    return evaluate(two_pass_group_norm, up(x), groups, up(weight), up(bias), eps, up(dy))


def grouped(t, groups):
    """(N, C, *) as (N, G, C/G * HW) in float64 (sizes spelled out: -1 is ambiguous at N = 0)."""
    length = t.shape[1] // groups
    for s in t.shape[2:]:
        length *= s
    return t.detach().to(torch.float64).reshape(t.shape[0], groups, length)


def _grouped_nonfinite(t, groups, per_channel):
    """Non-finite flags per (n, g) group of an (N, C, *) tensor, or per channel of (C,)."""
    bad = ~torch.isfinite(t.detach().to(torch.float64))
    if per_channel:
        return bad
    return grouped(bad, groups).bool().any(-1) if bad.numel() else torch.zeros(t.shape[0], groups, dtype=torch.bool)


def _slack(name, x, groups, weight, bias, eps, dy):
    """A few rounding errors of x's dtype, times the inputs' amplification of them."""
    unit = torch.finfo(x.dtype).eps
    n, c = x.shape[0], x.shape[1]
    finite_max = lambda t: float(t[torch.isfinite(t)].abs().max()) if torch.isfinite(t).any() else 0.0  # noqa: E731
    with torch.no_grad():
        xg = grouped(x, groups)
        var = ((xg - xg.mean(-1, keepdim=True)) ** 2).mean(-1)
        rstd = torch.rsqrt(var + eps)
        # |x| * rstd per group: x - mean loses that many units of |x|'s last place
        gain = finite_max(xg.abs().amax(-1) * rstd)
        r = finite_max(rstd)
    w = max(1.0, 0.0 if weight is None else finite_max(weight.to(torch.float64)))
    b = 0.0 if bias is None else finite_max(bias.to(torch.float64))
    g = finite_max(dy.to(torch.float64))
    per_channel = x.numel() // max(1, c)
    # (gain + 1): a few units of the result's own size where x - mean loses nothing
    scale = {"y": (gain + 1) * w + b, "dx": 4 * (gain + 1) * r * w * g, "dweight": (gain + 1) * g * per_channel,
             "dbias": g * per_channel}[name]
    return SLACK_ULPS * unit * scale + 1e-300


def undefined_groups(x, groups, eps):
    """(N, G) flags of the groups whose normalised value is 0 / 0: constant, eps = 0."""
    n = x.shape[0]
    xg = grouped(x, groups)
    if eps != 0 or xg.shape[-1] == 0:
        return torch.zeros(n, groups, dtype=torch.bool)
    return (xg.amax(-1) == xg.amin(-1)) & torch.isfinite(xg).all(-1)


def _spread(flags, like, groups, per_channel):
    """(N, G) group flags as flags over the elements of ``like`` (N, C, *), or over its
    channels (C,) for a parameter gradient (any sample's group)."""
    if per_channel:
        return flags.any(0).repeat_interleave(like.shape[0] // groups)
    n = flags.shape[0]
    return flags[:, :, None].expand(n, groups, like.numel() // max(1, n * groups)).reshape(like.shape)


def judge(x, groups, weight, bias, eps, dy, fn=groupnorm.group_norm):
    """Assert fn matches float64 as well as torch does (see the module docstring)."""
    ours = evaluate(fn, x, groups, weight, bias, eps, dy)
    peer = evaluate(F.group_norm, x, groups, weight, bias, eps, dy)
    if isinstance(peer, Exception):
        assert isinstance(ours, type(peer)) or isinstance(ours, Exception) and type(ours).__name__ == type(
            peer).__name__, f"torch raised {peer!r}, we gave {type(ours).__name__}"
        return
    assert not isinstance(ours, Exception), f"we raised {ours!r}, torch did not"
    ref = float64_reference(x, groups, weight, bias, eps, dy)
    undefined = undefined_groups(x, groups, eps)
    for name, a, t, r in zip(("y", "dx", "dweight", "dbias"), ours, peer, ref):
        if r is None:
            continue
        assert a.shape == t.shape and a.dtype == t.dtype, f"{name}: {a.shape} {a.dtype} vs {t.shape} {t.dtype}"
        per_channel = name in ("dweight", "dbias")
        a_nf = _grouped_nonfinite(a, groups, per_channel)
        t_nf = _grouped_nonfinite(t, groups, per_channel)
        r = r.masked_fill(r.abs() > torch.finfo(a.dtype).max, float("inf"))   # overflows in a's dtype
        r_nf = _grouped_nonfinite(r, groups, per_channel)
        skip = undefined if not per_channel else _spread(undefined, a, groups, True)
        wrong = ((a_nf & ~t_nf & ~r_nf) | (~a_nf & t_nf & r_nf)) & ~skip
        assert not wrong.any(), (f"{name}: non-finite groups differ from torch's: ours {a_nf.nonzero().tolist()} "
                                 f"torch {t_nf.nonzero().tolist()}")
        a64, t64 = a.to(torch.float64), t.to(torch.float64)
        both = (torch.isfinite(a64) & torch.isfinite(t64) & torch.isfinite(r)
                & ~_spread(undefined, a, groups, per_channel))
        if not both.any():
            continue
        err = float((a64 - r)[both].abs().max())
        peer_err = float((t64 - r)[both].abs().max())
        slack = _slack(name, x, groups, weight, bias, eps, dy)
        assert err <= 2 * peer_err + slack, (f"{name}: error {err:.3e} > 2 x torch's {peer_err:.3e} + "
                                             f"{slack:.3e}")
