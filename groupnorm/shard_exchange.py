"""The all-reduce that shares sharded GroupNorm statistics and checks that the ranks agree.

Why the check lives inside the exchange: ranks whose shards disagree (another batch size,
channel count, num_groups or dtype) must not reach a collective of another size. gloo
ends the process of the rank that receives more bytes than it posted (an uncatchable
``std::terminate``) and the other rank reads "connection reset"; NCCL may hang or mix
data. So the first all-reduce of every sharded forward has a size that depends only on the
group's size: each rank writes one row (its facts, its element count and as many
statistics as fit), the SUM gathers the rows, and every rank compares the facts before
anything else crosses. All ranks see the same rows, so all raise the same error, and the
group stays usable. Only when the facts agree and N * G exceeds ``INLINE_GROUPS`` does a
second all-reduce carry the remaining statistics, of a size every rank now knows to match.

A row, float64 (exact for counts below 2^53 and for every float32 statistic):
    [status, N, C, num_groups, dtype code, count, mean and m2 of up to INLINE_GROUPS (n, g)]
status: VALID when the rank's input passed its checks; FAILED when it did not (that rank
raises its own error after the exchange, the others a RuntimeError naming it); 0 for a row
nobody wrote.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist

from .validation import FLOAT_DTYPES

Tensor = torch.Tensor

VALID, FAILED = 1.0, 2.0
FACTS = 6                      # status, N, C, num_groups, dtype code, element count per group
INLINE_GROUPS = 64             # (n, g) pairs whose mean and m2 ride in the first all-reduce
ROW = FACTS + 2 * INLINE_GROUPS
_DTYPE_CODE = {dtype: float(i + 1) for i, dtype in enumerate(FLOAT_DTYPES)}
_CODE_DTYPE = {code: dtype for dtype, code in _DTYPE_CODE.items()}


def check_process_group(process_group) -> None:
    """TypeError unless ``process_group`` is a torch.distributed ProcessGroup (checked on
    each rank alone: without a group there is nobody to tell)."""
    group_type = getattr(dist, "ProcessGroup", None) if dist.is_available() else None
    if group_type is not None and isinstance(process_group, group_type):
        return
    if dist.is_available() and process_group is dist.GroupMember.NON_GROUP_MEMBER:
        raise TypeError("group_norm(): process_group is torch.distributed's NON_GROUP_MEMBER: this rank is "
                        "not in the group it was given (dist.new_group returns that to non-members)")
    hint = " (for a DeviceMesh, pass mesh.get_group(dim))" if type(process_group).__name__ == "DeviceMesh" else ""
    raise TypeError("group_norm(): process_group must be a torch.distributed.ProcessGroup, such as "
                    f"dist.group.WORLD or one from dist.new_group(), not {type(process_group).__name__}{hint}")


def exchange_stats(x: Tensor, num_groups: int, mean: Tensor, m2: Tensor, group
                   ) -> Tuple[List[int], Tensor, Tensor]:
    """Every rank's (count, mean, m2) for x's shard, after checking that all ranks agree.

    mean, m2: this rank's (N, G) statistics. Returns the per-group element count of each
    rank (Python ints) and every rank's mean and m2 as (world, N, G) float64, in rank order.
    Raises RuntimeError, on every rank alike, when the ranks' N, C, num_groups or dtype
    differ or a rank's input failed its checks.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = x.shape[0]
    pairs = n * num_groups
    count = x.numel() // pairs if pairs else 0
    flat = torch.cat((mean.reshape(-1), m2.reshape(-1))).to(torch.float64)
    inline = min(flat.numel(), 2 * INLINE_GROUPS)
    buf = torch.zeros(world, ROW, dtype=torch.float64, device=x.device)
    facts = (VALID, n, x.shape[1], num_groups, _DTYPE_CODE[x.dtype], count)
    buf[rank, :FACTS] = torch.tensor(facts, dtype=torch.float64)
    buf[rank, FACTS:FACTS + inline] = flat[:inline]
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    rows = buf[:, :FACTS].cpu().tolist()
    check_agreement(rows)
    stats = buf[:, FACTS:FACTS + inline]
    if inline < flat.numel():   # same size on every rank: the facts just agreed
        rest = torch.zeros(world, flat.numel() - inline, dtype=torch.float64, device=x.device)
        rest[rank] = flat[inline:]
        dist.all_reduce(rest, op=dist.ReduceOp.SUM, group=group)
        stats = torch.cat((stats, rest), dim=1)
    counts = [int(row[5]) for row in rows]
    return counts, stats[:, :pairs].reshape(world, n, num_groups), stats[:, pairs:].reshape(world, n, num_groups)


def exchange_failure(input, group) -> None:
    """Join the first all-reduce as a rank whose input failed its checks, so that the other
    ranks raise too instead of waiting in the collective (the caller then raises its error)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    buf = torch.zeros(world, ROW, dtype=torch.float64, device=_exchange_device(input, group))
    buf[rank, 0] = FAILED
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)


def _exchange_device(input, group) -> torch.device:
    # The failing rank's buffer must live where the backend communicates.
    if isinstance(input, Tensor) and input.device.type != "meta":
        return input.device
    if "nccl" in str(dist.get_backend(group)).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_agreement(rows: Sequence[Sequence[float]]) -> None:
    """RuntimeError unless every row is VALID with the same N, C, num_groups and dtype."""
    failed = [r for r, row in enumerate(rows) if row[0] == FAILED]
    if failed:
        raise RuntimeError(
            f"group_norm(process_group=...): the input on rank(s) {failed} failed group_norm's checks (the "
            "error is raised there); no rank normalised. Every rank must pass a valid shard.")
    missing = [r for r, row in enumerate(rows) if row[0] != VALID]
    if missing:
        raise RuntimeError(
            f"group_norm(process_group=...): rank(s) {missing} sent no shard facts: every rank of the group "
            "must call group_norm together, with the same process group.")
    if any(row[1:5] != rows[0][1:5] for row in rows):
        described = "; ".join(f"rank {r}: {_describe(row)}" for r, row in enumerate(rows))
        raise RuntimeError(
            "group_norm(process_group=...): the ranks' shards disagree. Every rank needs the same batch "
            f"size N, channels C, num_groups and dtype (only the spatial sizes may differ); got {described}.")


def _describe(row: Sequence[float]) -> str:
    dtype = _CODE_DTYPE.get(row[4], "unknown")
    return f"N={int(row[1])}, C={int(row[2])}, num_groups={int(row[3])}, dtype={dtype}"
