"""GroupNorm over a tensor split spatially across the ranks of a process group.

Why: patch-parallel models (one image, many devices) must normalise every shard with the
statistics of the whole image. Each rank computes its shard's exact partial statistics,
one all-reduce shares them, and every rank merges all ranks' parts in rank order with
Chan's formula (``stats.merge64``), so all ranks get bit-identical statistics, whatever
the shard sizes (uneven or empty shards are fine, and so is any spatial split dimension).

Communication per call:
  forward   one all-reduce (SUM) of a buffer (world, 2 + 2 * N * G): each rank writes its own
            row (element count, mean, m2) and zeros elsewhere, so the sum is an all-gather
            in a single collective, and merging stays exact (no E[x^2] - E[x]^2).
  backward  one all-reduce (SUM) of the (2, N, G) group sums that dx needs.

The buffer is float32 (float64 for a float64 input); the per-rank element count travels as
two exactly representable halves, so counts beyond 2^24 stay exact.

Gradients: each rank returns dx for its shard (exact, as the slice of single-process dx)
and its shard's contribution to dweight, dbias, dscale and dshift. Summed over ranks these
equal the single-process gradients — the same convention as every other layer of a
spatially sharded model (a conv's weight gradient is per-shard too), which the usual
gradient all-reduce (e.g. DDP's) completes. All ranks must call forward and backward
together, as for any collective.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import grad_terms, ops
from .reference import acc_dtype
from .stats import merge64

Tensor = torch.Tensor

_HALF = float(2 ** 24)  # counts split as hi * 2^24 + lo, both exact in float32


def sharded_group_norm(x: Tensor, num_groups: int, weight, bias, eps: float, act: str,
                       scale, shift, process_group) -> Tensor:
    """``group_norm(..., process_group=pg)``: x is this rank's spatial shard."""
    return _ShardedGroupNorm.apply(x, weight, bias, scale, shift, num_groups, float(eps), act, process_group)


def global_stats(x: Tensor, num_groups: int, process_group):
    """Statistics of the whole sharded tensor, identical on every rank (one all-reduce).

    Returns (count, mean, m2): count per group as a Python int, mean and m2 (N, G) float64.
    """
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    n = x.shape[0]
    ng = n * num_groups
    local_mean, local_m2 = ops.stats(x, num_groups)
    local_count = x.numel() // ng if ng else 0
    buf = torch.zeros(world, 2 + 2 * ng, dtype=acc_dtype(x.dtype), device=x.device)
    hi, lo = divmod(local_count, int(_HALF))
    buf[rank, 0], buf[rank, 1] = float(hi), float(lo)
    buf[rank, 2:2 + ng] = local_mean.reshape(-1)
    buf[rank, 2 + ng:] = local_m2.reshape(-1)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=process_group)
    rows = buf.to(torch.float64)
    counts = [int(hi) * int(_HALF) + int(lo) for hi, lo in rows[:, :2].tolist()]
    parts = [(torch.full((n, num_groups), float(counts[r]), dtype=torch.float64, device=x.device),
              rows[r, 2:2 + ng].reshape(n, num_groups), rows[r, 2 + ng:].reshape(n, num_groups))
             for r in range(world)]
    _, mean, m2 = merge64(parts)
    return sum(counts), mean, m2


class _ShardedGroupNorm(torch.autograd.Function):
    """Forward: global statistics, then ``apply``. Backward: local (N, C) sums ->
    (N, G) group sums -> all-reduce -> ``backward_dx`` with the global count.

    Derivation: dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)), where
    mean_g runs over the whole group, i.e. over every rank's shard; the two group sums are
    the only non-local terms, so they are all that crosses ranks.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, num_groups, eps, act, group):
        count, mean64, m264 = global_stats(x, num_groups, group)
        acc = acc_dtype(x.dtype)
        mean = mean64.to(acc).contiguous()
        rstd = torch.rsqrt(m264 / max(count, 1) + eps).to(acc).contiguous()
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.num_groups, ctx.act, ctx.group, ctx.count = num_groups, act, group, count
        return ops.apply(x, mean, rstd, weight, bias, scale, shift, num_groups, act)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        g, act = ctx.num_groups, ctx.act
        a, b = ops.backward_reduce(dy, x, mean, rstd, weight, bias, scale, shift, g, act)
        # Always reduce, even where this rank needs no dx: every rank must join the collective.
        sums = torch.stack(grad_terms.group_sums(a, b, weight, scale, g))
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
        needs = ctx.needs_input_grad
        dx = None
        if needs[0]:
            dx = ops.backward_dx(dy, x, mean, rstd, weight, bias, scale, shift,
                                 sums[0], sums[1], ctx.count, g, act)
        params = grad_terms.param_grads(a, b, weight, bias, scale, shift)
        params = [p if need else None for p, need in zip(params, needs[1:5])]
        return (dx, *params, None, None, None, None)
