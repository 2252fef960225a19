"""y = act((x - mean) * A + B), elementwise, in x's layout (see coefs for A and B).

Rows of the contiguous layout are (n, c) planes of HW elements; rows of channels-last
are (n, hw) pixels of C elements with per-channel coefficient vectors. With an
activation, values are staged in a small float buffer so the activation branch is taken
once per block and the load/store loops stay vectorisable.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .activations import NONE, activate_block
from .elements import load, store

BLOCK = 512           # staging buffer length for activations
PIXEL_CHUNK = 16384   # channels-last: elements per parallel task (rows = PIXEL_CHUNK // C)
JIT = dict(cache=True, error_model="numpy", fastmath={"contract", "nsz"})


@njit(**JIT)
def apply_span(xr, yr, start, length, m, ar, br, act, buf):
    """yr[start:start+length] = act((xr - m) * ar + br); buf: (BLOCK,) scratch.

    Loops run zero-based over slice views: Numba then drops the negative-index check
    and LLVM vectorises them.
    """
    xs = xr[start:start + length]
    ys = yr[start:start + length]
    if act == NONE:
        for i in range(length):
            store(ys, i, (load(xs, i) - m) * ar + br)
    else:
        for lo in range(0, length, BLOCK):
            count = min(BLOCK, length - lo)
            xb = xs[lo:lo + count]
            yb = ys[lo:lo + count]
            for j in range(count):
                buf[j] = (load(xb, j) - m) * ar + br
            activate_block(buf, count, act)
            for j in range(count):
                store(yb, j, buf[j])


@njit(**JIT)
def apply_rows_none(x, y, lo, hi, mean_c, a, b):
    """Rows lo..hi-1 without an activation, indexing the 2-D arrays directly: no per-row
    views (each costs reference-count updates, as much as a short row's work)."""
    length = x.shape[1]
    for r in range(lo, hi):
        m = mean_c[r]
        ar = a[r]
        br = b[r]
        for i in range(length):
            store(y, (r, i), (load(x, (r, i)) - m) * ar + br)


@njit(**JIT)
def apply_row_block(x, y, lo, hi, mean_c, a, b, act):
    """Rows lo..hi-1 of the contiguous layout, one staging buffer for all of them."""
    if act == NONE:
        apply_rows_none(x, y, lo, hi, mean_c, a, b)
        return
    buf = np.empty(BLOCK, a.dtype)
    for r in range(lo, hi):
        apply_span(x[r], y[r], 0, x.shape[1], mean_c[r], a[r], b[r], act, buf)


@njit(parallel=True, **JIT)
def apply_rows(x, y, mean_c, a, b, act):
    """Contiguous layout. x, y: (N*C, HW); mean_c, a, b: (N*C,).

    Tasks are blocks of about PIXEL_CHUNK elements (whole rows), so small planes (HW = 64)
    do not pay a buffer allocation and a task start per row.
    """
    rows, length = x.shape
    per_task = max(1, PIXEL_CHUNK // max(length, 1))
    tasks = (rows + per_task - 1) // per_task
    for task in prange(tasks):
        lo = task * per_task
        apply_row_block(x, y, lo, min(lo + per_task, rows), mean_c, a, b, act)


@njit(**JIT)
def apply_pixels(xb, yb, mc, an, bn, act):
    """One (rows, C) channels-last block; a plain callee so LLVM vectorises it."""
    rows, channels = xb.shape
    if act == NONE:        # 2-D indexing: no per-row views (reference-count updates)
        for r in range(rows):
            for c in range(channels):
                store(yb, (r, c), (load(xb, (r, c)) - mc[c]) * an[c] + bn[c])
        return
    buf = np.empty(channels, an.dtype)
    for r in range(rows):
        xr = xb[r]
        yr = yb[r]
        if True:
            for c in range(channels):
                buf[c] = (load(xr, c) - mc[c]) * an[c] + bn[c]
            activate_block(buf, channels, act)
            for c in range(channels):
                store(yr, c, buf[c])


@njit(parallel=True, **JIT)
def apply_channels_last(x, y, mean_c, a, b, act):
    """Channels-last layout. x, y: (N, HW, C); mean_c, a, b: (N, C)."""
    n_batch, hw, channels = x.shape
    block_rows = max(1, PIXEL_CHUNK // channels)
    blocks = (hw + block_rows - 1) // block_rows
    for task in prange(n_batch * blocks):
        n = task // blocks
        lo = (task - n * blocks) * block_rows
        hi = min(lo + block_rows, hw)
        apply_pixels(x[n, lo:hi], y[n, lo:hi], mean_c[n], a[n], b[n], act)
