"""GroupNorm over a tensor split spatially across the ranks of a process group.

Why: patch-parallel models (one image, many devices) must normalise every shard with the
statistics of the whole image. Each rank computes its shard's exact partial statistics,
one all-reduce shares them, and every rank merges all ranks' parts in rank order with
Chan's formula (``stats.merge64``), so all ranks get bit-identical statistics, whatever
the shard sizes (uneven or empty shards are fine, and so is any spatial split dimension).

Communication per call (see ``shard_exchange``):
  forward   one all-reduce (SUM) of a (world, 134) float64 buffer: each rank writes its own
            row (its shard's facts, element count, mean and m2) and zeros elsewhere, so the
            sum is an all-gather in a single collective; merging stays exact (no
            E[x^2] - E[x]^2). The facts (N, C, num_groups, dtype, whether the input passed
            its checks) are compared on every rank before anything else, so ranks that
            disagree all raise a RuntimeError instead of meeting in collectives of different
            sizes. Where N * G > 64 the remaining statistics take a second all-reduce.
  backward  one all-reduce (SUM) of the (2, N, G) group sums that dx needs.

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

from . import grad_terms, ops, validation
from .epilogue import activation_name
from .functional import kernel_layout
from .reference import acc_dtype
from .shard_exchange import check_process_group, exchange_failure, exchange_stats
from .stats import merge64

Tensor = torch.Tensor


def sharded_group_norm(input: Tensor, num_groups, weight, bias, eps, activation, scale, shift, stats,
                       process_group) -> Tensor:
    """``group_norm(..., process_group=pg)``: input is this rank's spatial shard.

    The argument checks run here, not before: a rank whose input fails them still joins the
    first all-reduce (flagged as failed) before raising, so the other ranks raise too rather
    than wait in the collective.
    """
    if stats is not None:
        raise ValueError("group_norm(): pass either stats= or process_group=, not both "
                         "(a process group computes the statistics itself)")
    check_process_group(process_group)
    try:
        # torch's one-value-per-group check concerns the whole tensor: see global_stats.
        validation.check_inputs(input, num_groups, weight, bias, scale, shift, training_check=False, eps=eps)
        num_groups, eps = validation.as_num_groups(num_groups), validation.as_eps(eps)
        act = "none" if activation is None else activation_name(activation)
    except Exception:
        exchange_failure(input, process_group)
        raise
    return _ShardedGroupNorm.apply(kernel_layout(input), weight, bias, scale, shift, num_groups, eps, act,
                                   process_group)


def global_stats(x: Tensor, num_groups: int, process_group):
    """Statistics of the whole sharded tensor, identical on every rank (one all-reduce while
    N * G <= 64). Returns (count, mean, m2): count per group as a Python int, mean and m2
    (N, G) float64. Raises on every rank where the ranks' shards disagree."""
    n = x.shape[0]
    local_mean, local_m2 = ops.stats(x, num_groups)
    counts, means, m2s = exchange_stats(x, num_groups, local_mean, local_m2, process_group)
    total = sum(counts)
    if n * total == 1:   # torch's check, on the whole tensor: one value per group
        raise ValueError("Expected more than 1 value per channel when training, got a sharded input with "
                         f"N={n}, num_groups={num_groups} and {total} value(s) per group")
    parts = [(torch.full((n, num_groups), float(c), dtype=torch.float64, device=x.device), means[r], m2s[r])
             for r, c in enumerate(counts)]
    _, mean, m2 = merge64(parts)
    return total, mean, m2


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
