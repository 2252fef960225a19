"""Launch plans: path, grid, block sizes, split counts and warps, from shapes by plain Python.

No autotuning and no look at tensor values, so every op is CUDA-graph capturable and the
same shape always runs the same programs (the reductions are bitwise deterministic).
The module constants are the knobs; tests monkeypatch them so tiny shapes take each path.

Paths. The forward and the whole backward pick the first path in ``FORWARD_PATHS`` /
``BACKWARD_PATHS`` whose chooser returns a plan for the shape; a new path is a chooser
function put in those tuples at the place of its priority, and a name its launcher
dispatches on (``launch.forward`` / ``launch.backward_grads``).

    forward   "fused"  one program per group, the group in registers      1 launch
              "group"  one program per group, read twice (L2)             1 launch
              "split"  split statistics, then the apply merging them      2 launches
    backward  "group"  one program per group: sums then dx;               1 launch
                       dweight/dbias summed over n by a second launch    +1 with weight/bias
              "split"  tile partials, then their merge with dx            2 launches
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

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
# The "group" paths take groups of at most this many elements: every SD 1.5 / SDXL UNet
# group in the GPU suite (the largest, 640x64x64 / 32, is 81920) and every SD 1.5 UNet
# group at 64x64 latents (960x64x64 / 32: 122880). Larger groups (VAE decoders, video,
# SDXL's 128x128 latents) keep the split path, which spreads a group over many programs:
# at batch 1 a program per group would leave most SMs idle where GPU time dominates.
GROUP_MAX_GROUP = 1 << 17
# Elements one "group" forward program loads per loop step (a power of two), and the
# elements of one "group" backward tile [BLOCK_CPG, BLOCK_HW]: at batch 1 a program has
# an SM to itself, so a step must keep many loads in flight.
GROUP_BLOCK = 8192
BACKWARD_TILE = 4096
# Channels one param_sums_kernel program owns.
PARAM_BLOCK = 256


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


# Batch invariance: a group's reduction order (how many partials, where they split) may
# depend on the group alone, never on N or the device. The split paths therefore size their
# grids for one sample's groups on a reference device (an H100's SM count); a larger batch
# or another GPU gets more or fewer waves of the same programs, never other partials.
REFERENCE_SMS = 132


def split_plan(group_size: int, rows: int, num_sms: int, channels_last: bool = False) -> SplitPlan:
    """Plan for a pass over groups of ``group_size`` elements; ``rows`` is one sample's
    group count (G), ``num_sms`` is ignored for the split (see REFERENCE_SMS)."""
    block = min(LOOP_BLOCK, next_power_of_2(max(group_size, 1)))
    waves = WAVES_PER_SM if channels_last else WAVES_PER_SM_NCHW
    split = _split_count(group_size, rows, block, REFERENCE_SMS, waves)
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
    rows = cdiv(c, block_c)   # one sample's tiles on the reference device: see REFERENCE_SMS
    want = cdiv(target_programs(REFERENCE_SMS), rows)
    most = max(1, cdiv(hw * block_c, max(SPLIT_MIN_CHUNK, block_c * block_hw)))
    split = max(1, min(want, most, MAX_SPLIT))
    chunk_hw = cdiv(cdiv(hw, split), block_hw) * block_hw
    split = cdiv(hw, chunk_hw)
    return ReducePlan(block_c=block_c, block_hw=block_hw, chunk_hw=chunk_hw, split=split,
                      num_warps=_warps(block_c * block_hw))


@dataclass(frozen=True)
class Shape:
    """The facts every plan is chosen from: x as (N, C, HW), G groups, its layout."""
    n: int
    c: int
    hw: int
    g: int
    channels_last: bool

    @property
    def cpg(self) -> int:
        return self.c // self.g

    @property
    def group_size(self) -> int:
        return self.c // self.g * self.hw

    @property
    def rows(self) -> int:
        return self.n * self.g


@dataclass(frozen=True)
class ForwardPlan:
    path: str                       # a name in the module docstring's table
    launches: int
    grid: Tuple[int, ...]           # the first launch's grid
    block: int                      # elements per program step (the group, for "fused")
    num_warps: int
    split: Optional[SplitPlan] = None   # "split": the plan both launches share
    tile_c: int = 1                 # "group", NCHW: the apply's tile [tile_c, tile_hw]
    tile_hw: int = 1


@dataclass(frozen=True)
class BackwardPlan:
    path: str
    launches: int
    grid: Tuple[int, ...]           # the first launch's grid
    block_cpg: int = 0              # "group": tile [block_cpg, block_hw]
    block_hw: int = 0
    num_warps: int = 1


def _fused_forward(s: Shape, num_sms: int) -> Optional[ForwardPlan]:
    if not use_fused(s.group_size):
        return None
    p = fused_plan(s.group_size)
    return ForwardPlan("fused", 1, (s.rows,), p.block, p.num_warps)


def _group_forward(s: Shape, num_sms: int) -> Optional[ForwardPlan]:
    if s.group_size > GROUP_MAX_GROUP:
        return None
    block = min(GROUP_BLOCK, next_power_of_2(s.group_size))
    tile_hw = min(next_power_of_2(s.hw), block)
    tile_c = 1 if s.channels_last else min(next_power_of_2(s.cpg), max(1, block // tile_hw))
    return ForwardPlan("group", 1, (s.rows,), block, _warps(block), tile_c=tile_c,
                       tile_hw=1 if s.channels_last else tile_hw)


def _split_forward(s: Shape, num_sms: int) -> ForwardPlan:
    p = split_plan(s.group_size, s.g, num_sms, s.channels_last)
    return ForwardPlan("split", 2, (s.rows, p.split), p.block, p.num_warps, p)


FORWARD_PATHS: Tuple[Callable[[Shape, int], Optional[ForwardPlan]], ...] = (
    _fused_forward, _group_forward, _split_forward)


def forward_plan(s: Shape, num_sms: int) -> ForwardPlan:
    """The forward's plan: the first path in FORWARD_PATHS that takes the shape."""
    for choose in FORWARD_PATHS:
        p = choose(s, num_sms)
        if p is not None:
            return p
    raise AssertionError("the split path takes every shape")


def _group_backward(s: Shape, num_sms: int, param_sums: bool) -> Optional[BackwardPlan]:
    block_cpg = next_power_of_2(s.cpg)
    if s.group_size > GROUP_MAX_GROUP or block_cpg > BACKWARD_TILE:
        return None
    block_hw = min(next_power_of_2(s.hw), max(1, BACKWARD_TILE // block_cpg))
    return BackwardPlan("group", 1 + int(param_sums), (s.rows,), block_cpg, block_hw,
                        _warps(block_cpg * block_hw))


def _split_backward(s: Shape, num_sms: int, param_sums: bool) -> BackwardPlan:
    r = reduce_plan(s.n, s.c, s.hw, s.channels_last, num_sms)
    return BackwardPlan("split", 2, (s.n, cdiv(s.c, r.block_c), r.split), num_warps=r.num_warps)


BACKWARD_PATHS: Tuple[Callable[[Shape, int, bool], Optional[BackwardPlan]], ...] = (
    _group_backward, _split_backward)


def backward_plan(s: Shape, num_sms: int, param_sums: bool = True) -> BackwardPlan:
    """The whole backward's plan (``param_sums``: dweight or dbias is wanted)."""
    for choose in BACKWARD_PATHS:
        p = choose(s, num_sms, param_sums)
        if p is not None:
            return p
    raise AssertionError("the split path takes every shape")


def knobs() -> Tuple:
    """Every module constant a plan reads: part of the launcher's plan memo key, so a
    monkeypatched knob (the tests) is never answered by a plan made under another."""
    return (FUSED_MAX_GROUP, LOOP_BLOCK, SPLIT_MIN_CHUNK, MAX_SPLIT, WAVES_PER_SM, WAVES_PER_SM_NCHW,
            CPU_NUM_SMS, REDUCE_TILE, GROUP_MAX_GROUP, GROUP_BLOCK, BACKWARD_TILE, PARAM_BLOCK,
            FORWARD_PATHS, BACKWARD_PATHS)


def param_grid(c: int) -> Tuple[int]:
    return (cdiv(c, PARAM_BLOCK),)
