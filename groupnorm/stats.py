"""Exact GroupNorm statistics that can be collected in parts and merged.

Why: a tensor normalised in tiles (tiled VAE decoding) or in shards (patch parallelism)
must use the statistics of the whole tensor, or every tile boundary becomes a seam. Each
part yields ``GroupStats`` (count, mean, m2 = sum of squared deviations, per (n, g)); parts
combine exactly with Chan's parallel formula, never through E[x^2] - E[x]^2.

    stats = merge_stats([group_stats(tile, G, mask=owned) for tile, owned in tiles])
    y_tile = group_norm(tile, G, weight, bias, eps, stats=stats)   # same as on the whole

Dtypes: statistics are float32, or float64 for a float64 input (the kernels' accumulation
dtype); ``merge_stats`` merges in float64 and returns the widest dtype among its parts.
Precision: merging is exact given the parts; what it inherits is each part's float32 mean
rounding, which enters m2 through (mean_b - mean_a)^2. For |mean| / std up to ~10 (typical
activations) merged statistics match the whole tensor's within 1e-6 relative; for far
larger offsets (|mean| / std ~ 1e4) expect ~1e-5, or pass a float64 tensor.
Gradients: the statistics are functions of the tensors they came from. ``group_stats`` of
an x that requires grad returns mean and m2 that carry x's gradient, ``merge_stats`` passes
it on, and ``group_norm(..., stats=)`` sends gradients into the statistics, so training on
tiles (statistics merged over the tiles, each tile normalised with them) gives x, weight
and bias the gradients of ``F.group_norm`` on the whole tensor. Statistics of a tensor that
needs no gradient (or collected under ``torch.no_grad``) are constants and cost nothing
extra; ``GroupStats(...).detach()`` makes any statistics constants on purpose.
Errors: a bad input tensor or num_groups raises what ``group_norm`` raises (torch's
types); bad statistics arguments (shapes, masks, empty lists) raise ``ValueError``, and a
``stats`` that is not a ``GroupStats`` raises ``TypeError``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from . import grad_terms, ops, validation
from .reference import acc_dtype

Tensor = torch.Tensor


@dataclass(frozen=True)
class GroupStats:
    """Per-(n, g) statistics of some set of elements, each field (N, G).

    count: number of elements; mean: their mean; m2: sum((x - mean)^2) over them.
    """

    count: Tensor
    mean: Tensor
    m2: Tensor

    @property
    def var(self) -> Tensor:
        """Biased variance m2 / count (what GroupNorm divides by); 0 where count is 0."""
        return self.m2 / self.count.clamp(min=1)

    def rstd(self, eps: float = 1e-5) -> Tensor:
        """1 / sqrt(var + eps), as GroupNorm computes it."""
        return torch.rsqrt(self.var + eps)

    @property
    def shape(self) -> torch.Size:
        return self.mean.shape

    def to(self, *args, **kwargs) -> "GroupStats":
        """All three fields moved/cast like ``Tensor.to``."""
        return GroupStats(*(t.to(*args, **kwargs) for t in (self.count, self.mean, self.m2)))

    def detach(self) -> "GroupStats":
        """The same statistics as constants: no gradient flows back to what they came from."""
        return GroupStats(*(t.detach() for t in (self.count, self.mean, self.m2)))


# --- collecting -----------------------------------------------------------------------

def group_stats(x: Tensor, num_groups: int, mask: Optional[Tensor] = None) -> GroupStats:
    """Statistics of ``x`` (N, C, *spatial) per (sample, group).

    ``mask`` (bool) selects the spatial positions that count, e.g. the region a tile owns
    when tiles overlap. It broadcasts against ``(N, *spatial)``, so a mask of the spatial
    shape applies to every sample and one with a leading N dimension gives each sample its
    own. Without a mask the kernels' statistics op runs; with one, a masked shifted
    two-pass in torch ops (mean first, then squared deviations from it).

    Where x requires grad (and grad mode is on), mean and m2 carry it: d mean / dx is
    1 / count and d m2 / dx is 2 (x - mean) on the counted elements. Otherwise they are
    constants, computed on x detached with nothing kept for a backward.
    """
    validation.check_inputs(x, num_groups, training_check=False)
    num_groups = validation.as_num_groups(num_groups)
    tracked = torch.is_grad_enabled() and x.requires_grad
    if not tracked:
        x = x.detach()
    n = x.shape[0]
    per_group = x.shape[1] // num_groups
    acc = acc_dtype(x.dtype)
    if mask is None:
        from .functional import kernel_layout

        x = kernel_layout(x)
        mean, m2 = _KernelStats.apply(x, num_groups) if tracked else ops.stats(x, num_groups)
        count = torch.full((n, num_groups), float(per_group * _spatial_numel(x)), dtype=acc, device=x.device)
        return GroupStats(count, mean, m2)
    return _masked_stats(x, num_groups, _check_mask(mask, x), acc)


class _KernelStats(torch.autograd.Function):
    """(mean, m2) per (n, g) from the statistics kernel, with their gradient in torch ops.

    mean = sum(x) / count and m2 = sum((x - mean)^2), so dx = dmean / count
    + 2 * dm2 * (x - mean): m2's dependence through the mean cancels, as sum(x - mean) = 0.
    The backward is plain torch ops on saved x and mean, so it is differentiable again.
    """

    @staticmethod
    def forward(ctx, x, num_groups):
        mean, m2 = ops.stats(x, num_groups)
        ctx.save_for_backward(x, mean)
        return mean, m2

    @staticmethod
    def backward(ctx, dmean, dm2):
        x, mean = ctx.saved_tensors
        n, g = mean.shape
        per = x.numel() // (n * g) if n * g else 0
        xg = x.reshape(n, g, per).to(mean.dtype)
        dxg = (dmean / max(per, 1))[:, :, None] + 2.0 * dm2[:, :, None] * (xg - mean[:, :, None])
        return dxg.reshape(x.shape).to(x.dtype), None


def _spatial_numel(x: Tensor) -> int:
    size = 1
    for s in x.shape[2:]:
        size *= s
    return size


def _check_mask(mask, x: Tensor) -> Tensor:
    # The mask as a bool (N, S) tensor on x's device, S = prod(spatial).
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must have dtype torch.bool, got {mask.dtype}")
    target = (x.shape[0], *x.shape[2:])
    try:
        full = mask.to(x.device).broadcast_to(target)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {list(mask.shape)} does not broadcast to (N, *spatial) = {list(target)} "
            f"for input of shape {list(x.shape)}") from None
    return full.reshape(x.shape[0], -1)


def _masked_stats(x: Tensor, num_groups: int, mask: Tensor, acc: torch.dtype) -> GroupStats:
    # x: (N, C, *), mask: (N, S). Shifted two-pass: no cancellation for large means.
    # Plain torch ops, so a tracked x gets its gradient from autograd.
    n, c = x.shape[0], x.shape[1]
    xg = x.reshape(n, num_groups, c // num_groups, -1).to(acc)
    m = mask[:, None, None, :]
    count = mask.sum(dim=1, dtype=torch.int64).mul(c // num_groups)  # (N,), exact integers
    count = count[:, None].expand(n, num_groups).to(acc)
    safe = count.clamp(min=1)
    zero = xg.new_zeros(())
    mean = torch.where(m, xg, zero).sum(dim=(2, 3)) / safe
    m2 = torch.where(m, (xg - mean[:, :, None, None]).square(), zero).sum(dim=(2, 3))
    return GroupStats(count.contiguous(), mean, m2)


# --- merging --------------------------------------------------------------------------

def merge_stats(parts: Sequence[GroupStats]) -> GroupStats:
    """Statistics of the union of disjoint parts, exactly (Chan et al.'s pairwise update).

    Parts are folded left to right in float64, so the result is deterministic and correct
    to float32 rounding whatever the parts' sizes; parts with count 0 contribute nothing.
    The fold is torch ops: gradients of parts that carry them flow through it.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_stats needs at least one GroupStats, got an empty sequence")
    for i, p in enumerate(parts):
        _check_stats(p, f"parts[{i}]")
        if p.shape != parts[0].shape:
            raise ValueError(
                f"merge_stats: parts[{i}] has shape {list(p.shape)} but parts[0] has {list(parts[0].shape)}")
    out = max((p.mean.dtype for p in parts), key=lambda d: torch.finfo(d).bits)
    count, mean, m2 = merge64([(p.count, p.mean, p.m2) for p in parts])
    return GroupStats(count.to(out), mean.to(out), m2.to(out))


def merge64(parts: Sequence[Tuple[Tensor, Tensor, Tensor]]) -> Tuple[Tensor, Tensor, Tensor]:
    """Chan's fold of (count, mean, m2) triples, in float64, in list order.

    For parts a, b with n = na + nb and delta = mean_b - mean_a:
        mean = mean_a + delta * nb / n,   m2 = m2_a + m2_b + delta^2 * na * nb / n
    """
    device = parts[0][1].device
    count, mean, m2 = (t.to(device=device, dtype=torch.float64) for t in parts[0])
    mean, m2 = _zero_empty(count, mean, m2)
    for part in parts[1:]:
        nb, mb, m2b = (t.to(device=device, dtype=torch.float64) for t in part)
        mb, m2b = _zero_empty(nb, mb, m2b)
        n = count + nb
        safe = n.clamp(min=1)
        delta = mb - mean
        mean = mean + delta * (nb / safe)
        m2 = m2 + m2b + delta.square() * (count * nb / safe)
        count = n
    return count, mean, m2


def _zero_empty(count: Tensor, mean: Tensor, m2: Tensor):
    # A part without elements has no mean: make sure whatever it holds cannot leak in.
    empty = count == 0
    return mean.masked_fill(empty, 0.0), m2.masked_fill(empty, 0.0)


def _check_stats(stats, name: str = "stats") -> None:
    if not isinstance(stats, GroupStats):
        raise TypeError(f"{name} must be a groupnorm.GroupStats, got {type(stats).__name__}")
    shapes = {f: tuple(getattr(stats, f).shape) for f in ("count", "mean", "m2")}
    if len(set(shapes.values())) != 1 or len(shapes["mean"]) != 2:
        raise ValueError(f"{name}: count, mean and m2 must all be (N, G), got shapes {shapes}")


# --- normalising with supplied statistics -----------------------------------------------

def group_norm_with_stats(x: Tensor, num_groups: int, weight, bias, eps: float, act: str,
                          scale, shift, stats: GroupStats) -> Tensor:
    """``group_norm(..., stats=stats)``: normalise x with statistics collected elsewhere.

    Gradients flow to x, weight, bias, scale and shift with the statistics held fixed, and
    on into ``stats.mean`` and ``stats.m2`` where those carry gradients (see
    ``group_stats``): dL/dmean = -rstd * sum_g(dxhat), dL/drstd = sum_g(dxhat * xhat) / rstd,
    the same two per-group sums the input gradient uses. With statistics of the whole
    tensor (merged over tiles) the tiles' gradients add up to F.group_norm's on the whole.
    Statistics that carry no gradient cost nothing extra. Fields on another device are moved
    to x's. Backward of backward through ``stats=`` is not supported.
    """
    _check_stats(stats)
    expected = (x.shape[0], num_groups)
    if tuple(stats.shape) != expected:
        raise ValueError(
            f"stats have shape {list(stats.shape)} but input of shape {list(x.shape)} with "
            f"num_groups={num_groups} needs (N, G) = {list(expected)}")
    acc = acc_dtype(x.dtype)
    s = stats.to(device=x.device, dtype=torch.float64)
    mean = s.mean.to(acc).contiguous()
    rstd = s.rstd(float(eps)).to(acc).contiguous()
    return _ApplyWithStats.apply(x, weight, bias, scale, shift, mean, rstd, num_groups, act)


class _ApplyWithStats(torch.autograd.Function):
    """y = apply(x, mean, rstd, ...) for given mean and rstd.

    dx with the statistics held fixed is rstd * dxhat: ``backward_dx`` with both group sums
    zero. The statistics' own gradients come from those group sums, when asked for.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, mean, rstd, num_groups, act):
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.num_groups, ctx.act = num_groups, act
        return ops.apply(x, mean, rstd, weight, bias, scale, shift, num_groups, act)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        g, act = ctx.num_groups, ctx.act
        needs = ctx.needs_input_grad
        grads = [None] * 9
        if needs[0]:
            zeros = torch.zeros_like(mean)
            # With both sums zero, count only scales zeros; it must not be 1, which tells the
            # backends every group holds one element (dx exactly 0 there).
            grads[0] = ops.backward_dx(dy, x, mean, rstd, weight, bias, scale, shift,
                                       zeros, zeros.clone(), 2, g, act)
        if any(needs[1:7]):
            a, b = ops.backward_reduce(dy, x, mean, rstd, weight, bias, scale, shift, g, act)
            params = grad_terms.param_grads(a, b, weight, bias, scale, shift)
            for i, grad in enumerate(params, start=1):
                grads[i] = grad if needs[i] else None
            if needs[5] or needs[6]:
                sum_dxhat, sum_dxhat_xhat = grad_terms.group_sums(a, b, weight, scale, g)
                grads[5] = (-rstd * sum_dxhat).to(mean.dtype) if needs[5] else None
                grads[6] = (sum_dxhat_xhat / rstd).to(rstd.dtype) if needs[6] else None
        return tuple(grads)
