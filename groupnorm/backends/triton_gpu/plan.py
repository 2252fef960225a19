"""Launch plans: block sizes, split counts and warps, chosen from shapes by plain Python.

No autotuning and no look at tensor values, so every op is CUDA-graph capturable and the
same shape always runs the same programs (the reductions are bitwise deterministic).
The module constants are the knobs; tests monkeypatch them so tiny shapes take each path.
"""
from __future__ import annotations

from dataclasses import dataclass

# A group of at most this many elements is held in registers by one program: the fused
# forward reads x once. Above it, statistics and apply are separate split passes.
FUSED_MAX_GROUP = 8192
# Elements one program of the split passes loads per loop step.
LOOP_BLOCK = 1024
# Fewest elements one program of a split pass handles (fewer is all launch overhead).
SPLIT_MIN_CHUNK = 4096
# Most programs one group's (or one channel block's) reduction is split into.
MAX_SPLIT = 256
# Programs per SM to aim for, so small N * G still fills the GPU. Measured on an H100
# (2026-11-26, benchmarks/tune_gpu.py, float16 forward, 8 against 4): NCHW split passes
# took 23-42% less time on (1,256,1024,1024), (8,512,128,128), (1,128,512,512), so NCHW
# uses 8. Channels-last was mixed (18% more time on the largest, the most GPU-bound shape,
# 29-32% less on the other two), so it stays at 4 until a cleaner measurement.
WAVES_PER_SM = 4
WAVES_PER_SM_NCHW = 8
# SM count assumed for CPU tensors (the Triton interpreter): small, keeps tests fast.
CPU_NUM_SMS = 4
# Elements of one backward_reduce tile [BLOCK_C, BLOCK_HW].
REDUCE_TILE = 2048


@dataclass(frozen=True)
class FusedPlan:
    block: int          # power of two >= group size
    num_warps: int


@dataclass(frozen=True)
class SplitPlan:
    block: int          # elements per loop step
    chunk: int          # elements per program, a multiple of block
    split: int          # programs per group
    num_warps: int


@dataclass(frozen=True)
class ReducePlan:
    block_c: int        # channels per tile
    block_hw: int       # spatial positions per tile (per loop step)
    chunk_hw: int       # spatial positions per program, a multiple of block_hw
    split: int          # programs along HW
    num_warps: int


def cdiv(a: int, b: int) -> int:
    """Ceiling division in plain Python (``triton.cdiv`` is a JIT function: ~7 us a call
    from the host, paid dozens of times per forward + backward)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n, 0 for 0 (as ``triton.next_power_of_2``); plain Python,
    like ``cdiv``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _warps(elements: int) -> int:
    # About 8 elements per thread (fewer for tiny blocks), 1 to 16 warps.
    return max(1, min(16, elements // 256))


def target_programs(num_sms: int, waves: int = 0) -> int:
    return max(1, num_sms * (waves or WAVES_PER_SM))


def use_fused(group_size: int) -> bool:
    return group_size <= FUSED_MAX_GROUP


def fused_plan(group_size: int) -> FusedPlan:
    block = next_power_of_2(max(group_size, 1))
    return FusedPlan(block=block, num_warps=_warps(block // 2))


def _split_count(length: int, rows: int, block: int, num_sms: int, waves: int) -> int:
    # Programs per row so rows * split reaches the target, each with >= SPLIT_MIN_CHUNK.
    want = cdiv(target_programs(num_sms, waves), max(rows, 1))
    most = max(1, cdiv(length, max(SPLIT_MIN_CHUNK, block)))
    return max(1, min(want, most, MAX_SPLIT))


def split_plan(group_size: int, rows: int, num_sms: int, channels_last: bool = False) -> SplitPlan:
    """Plan for a pass over ``rows`` groups (N * G) of ``group_size`` elements each."""
    block = min(LOOP_BLOCK, next_power_of_2(max(group_size, 1)))
    waves = WAVES_PER_SM if channels_last else WAVES_PER_SM_NCHW
    split = _split_count(group_size, rows, block, num_sms, waves)
    chunk = cdiv(cdiv(group_size, split), block) * block
    split = cdiv(group_size, chunk)  # no empty programs
    return SplitPlan(block=block, chunk=chunk, split=split, num_warps=_warps(block))


def reduce_plan(n: int, c: int, hw: int, channels_last: bool, num_sms: int) -> ReducePlan:
    """Plan for the per-(n, c) backward sums: tiles along the contiguous dimension."""
    c2, hw2 = next_power_of_2(c), next_power_of_2(hw)
    if channels_last:
        block_c = min(c2, max(1, min(128, REDUCE_TILE)))
        block_hw = min(hw2, max(1, REDUCE_TILE // block_c))
    else:
        block_hw = min(hw2, max(1, min(1024, REDUCE_TILE)))
        block_c = min(c2, max(1, REDUCE_TILE // block_hw))
    rows = n * cdiv(c, block_c)
    want = cdiv(target_programs(num_sms), rows)
    most = max(1, cdiv(hw * block_c, max(SPLIT_MIN_CHUNK, block_c * block_hw)))
    split = max(1, min(want, most, MAX_SPLIT))
    chunk_hw = cdiv(cdiv(hw, split), block_hw) * block_hw
    split = cdiv(hw, chunk_hw)
    return ReducePlan(block_c=block_c, block_hw=block_hw, chunk_hw=chunk_hw, split=split,
                      num_warps=_warps(block_c * block_hw))
