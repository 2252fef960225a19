"""Plans for the one-pass kernels (``onepass_kernels``): tiles, split, waves, from shapes only.

Plain Python, no look at values, so the same shape always runs the same programs (bitwise
repeatable) and every choice is testable without a GPU. The module constants are the knobs.
"""
from __future__ import annotations

from dataclasses import dataclass

from .plan import cdiv, next_power_of_2

# Elements one program holds on chip (a power of two): forward tile, backward tile (x and
# dy both held, so half).
TILE = 8192
TILE_BWD = 4096
# Threads per program: tile / (32 * elements per thread) warps, 1 to 16. Registers for
# float16 on sm_90 (ptxas, Triton 3.9, 2026-12-07): forward NCHW 8192 in 16 warps 64 and
# channels-last 85 (16 warps: one program per SM) or 106 (8 warps: two); backward 4096 in
# 8 warps 80-121 but channels-last streamed 164 (one per SM), 2048 in 8 warps 128.
ELEMS_PER_THREAD = 16
ELEMS_PER_THREAD_CL = 32
# Programs assumed resident per SM. The cooperative launch fails (and the caller falls
# back) when the compiled kernel's occupancy is lower, so this is a bound, not a promise.
RESIDENT_PER_SM = 2
# Channels-last: a span of whole groups at least this many bytes wide per pixel (full
# 32-byte sectors, and vector loads), whole C at most.
SPAN_MIN_BYTES = 128
# Partials one merge step loads per group array: MERGE_TILE over the groups of a row, at
# least MERGE_MIN (a [16, 256] merge tile took 186 registers, ptxas sm_90).
MERGE_TILE = 1024
MERGE_MIN = 32
# Rows a wave aims to cover: with one row per wave every wave is a chip-wide barrier (a
# load-latency bubble and a barrier round trip per few MB); several rows per wave drift
# apart and overlap, at the price of streaming (K > 1, a second read from L2).
MIN_ROWS_PER_WAVE = 4
# Streamed waves (a group too large for the chip) keep their data within this share of
# L2, so the apply pass re-reads it from L2.
L2_SHARE = 0.6
# L2 bytes assumed for CPU tensors (the Triton interpreter) and a forced int64 offset mode.
CPU_L2_BYTES = 1 << 20
FORCE_WIDE = False


@dataclass(frozen=True)
class OnePassPlan:
    span_g: int         # groups per row (one row = one barrier domain)
    block_c: int        # channels per tile, next power of two of span_g * C/G
    block_hw: int       # pixels per tile
    block_g: int        # next power of two of span_g
    k: int              # tiles per program: 1 holds the tile across the barrier
    split: int          # programs per row
    rows: int           # N * G / span_g
    rows_per_wave: int  # rows the grid covers at once; grid = rows_per_wave * split
    waves: int
    merge_s: int        # partials merged per step (a power of two, <= next power of two of split)
    num_warps: int
    wide: bool          # int64 offsets inside a sample (C * HW >= 2^31)

    @property
    def grid(self) -> int:
        return self.rows_per_wave * self.split


def span_groups(g: int, cpg: int, elem_bytes: int, channels_last: bool, max_channels: int) -> int:
    """Groups per row: 1 for NCHW (a group is contiguous); channels-last, the fewest whole
    groups (a divisor of G) spanning SPAN_MIN_BYTES per pixel, else all of C if it fits."""
    if not channels_last:
        return 1
    best = 0
    for d in range(1, g + 1):
        if g % d or next_power_of_2(d * cpg) > max_channels:
            continue
        best = d
        if d * cpg * elem_bytes >= SPAN_MIN_BYTES:
            break
    return best


def onepass_plan(n: int, c: int, hw: int, g: int, channels_last: bool, elem_bytes: int,
                 num_sms: int, l2_bytes: int, backward: bool = False, resident: int = 0):
    """Plan for N x C x HW in G groups, or None where a tile cannot hold a span's channels.
    ``resident``: programs per SM (default RESIDENT_PER_SM)."""
    cpg = c // g
    tile = TILE_BWD if backward else TILE
    span_g = span_groups(g, cpg, elem_bytes, channels_last, tile)
    if span_g == 0:
        return None
    block_c = next_power_of_2(span_g * cpg)
    if block_c > tile:  # one group's channels exceed a tile (HW tiny, C/G huge): split path
        return None
    block_hw = max(1, min(next_power_of_2(hw), tile // block_c))
    tiles = cdiv(hw, block_hw)
    rows = n * (g // span_g)
    capacity = max(1, num_sms * (resident or RESIDENT_PER_SM))
    # k (tiles per program, hence how a group's partials are grouped) is chosen from one
    # sample's rows, so a sample's reduction order is the same alone and in any batch.
    want_rows = max(1, min(g // span_g, MIN_ROWS_PER_WAVE))
    k = cdiv(tiles, max(1, capacity // want_rows))   # > 1: streamed, re-read from L2
    fit = rows
    if k > 1:  # a wave's data must stay within the L2 share so the second read hits it
        row_bytes = span_g * cpg * hw * elem_bytes * (2 if backward else 1)
        fit = max(1, int(L2_SHARE * l2_bytes) // max(row_bytes, 1))
        if fit < want_rows:  # fewer rows per wave, so more programs for each
            k = cdiv(tiles, max(1, capacity // fit))
    split = cdiv(tiles, k)
    rows_per_wave = max(1, min(capacity // split, fit))
    waves = cdiv(rows, rows_per_wave)
    rows_per_wave = cdiv(rows, waves)   # balanced waves, no idle tail programs
    per_thread = ELEMS_PER_THREAD_CL if channels_last else ELEMS_PER_THREAD
    return OnePassPlan(
        span_g=span_g, block_c=block_c, block_hw=block_hw, block_g=next_power_of_2(span_g),
        k=k, split=split, rows=rows, rows_per_wave=rows_per_wave, waves=waves,
        merge_s=min(next_power_of_2(split), max(MERGE_MIN, next_power_of_2(MERGE_TILE // next_power_of_2(span_g)))),
        num_warps=max(1, min(16, block_c * block_hw // (32 * per_thread))),
        wide=FORCE_WIDE or c * hw >= 2 ** 31)
