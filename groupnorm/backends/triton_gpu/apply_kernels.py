"""Apply kernel: normalise with given statistics, then the fused epilogue, split per group."""
from __future__ import annotations

import triton
import triton.language as tl

from .epilogue_jit import activation, group_offsets, pre_activation


@triton.jit
def apply_kernel(
    x_ptr,      # (N, C, *) input, NCHW or channels-last
    y_ptr,      # (N, C, *) output, x's dtype and memory format
    mean_ptr,   # (N, G) mean
    rstd_ptr,   # (N, G) rstd
    w_ptr,      # (C,) weight (unused without HAS_WEIGHT)
    b_ptr,      # (C,) bias (unused without HAS_BIAS)
    scale_ptr,  # (N, C) scale (unused without HAS_SCALE)
    shift_ptr,  # (N, C) shift (unused without HAS_SHIFT)
    C, HW, G, group_size, stride_x_n, stride_x_c, CHUNK,
    CPG: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (row, s) writes y = act(z1((x - mean) * rstd)) for its chunk of group ``row``."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    n = row // G
    g = row % G
    base = n * stride_x_n + g * CPG * stride_x_c
    mean = tl.load(mean_ptr + row).to(ACC)
    rstd = tl.load(rstd_ptr + row).to(ACC)
    for start in range(0, CHUNK, BLOCK):
        i = s * CHUNK + start + tl.arange(0, BLOCK)
        mask = i < group_size
        offs, c_local = group_offsets(i, C, HW, CPG, CHANNELS_LAST)
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        c = g * CPG + c_local
        z = pre_activation((x - mean) * rstd, n, c, mask, C, w_ptr, b_ptr, scale_ptr, shift_ptr,
                           HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
        y = activation(z, ACTIVATION)
        tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
