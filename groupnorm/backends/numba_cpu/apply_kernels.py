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
from .elements import load
from .fast_store import store_out as store   # elements.store's results, cheaper bf16
from .function_attributes import elementwise
from .pixel_tasks import activation_scratch, task_pixels, thread_run
from .streaming import stream_span, store_fence

BLOCK = 512           # staging buffer length for activations
PIXEL_CHUNK = 16384   # channels-last: elements per parallel task (rows = PIXEL_CHUNK // C)
STREAM_SPAN = 2048    # values staged per streamed piece (8 KB of float32: stays in L1)
JIT = dict(cache=True, error_model="numpy", fastmath={"nsz"})


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
def apply_span_streamed(xr, yr, start, length, m, ar, br, act, buf, out):
    """apply_span for an output written with streaming stores: each piece of up to
    out.size values is computed into out (y's dtype, so the same rounding as a direct
    store) and streamed to yr[start:start + length]. buf: float scratch as long as out
    (activations only)."""
    span = out.shape[0]
    for lo in range(0, length, span):
        count = min(span, length - lo)
        xs = xr[start + lo:start + lo + count]
        if act == NONE:
            for j in range(count):
                store(out, j, (load(xs, j) - m) * ar + br)
        else:
            for j in range(count):
                buf[j] = (load(xs, j) - m) * ar + br
            activate_block(buf, count, act)
            for j in range(count):
                store(out, j, buf[j])
        stream_span(yr, start + lo, out, count)


@njit(**JIT)
def stream_scratch(act, length, like, out_like):
    """(buf, out) of a streaming task: ``length`` floats of like's dtype (activations
    only) and ``length`` elements of the output's type."""
    return np.empty(length if act != NONE else 0, like.dtype), np.empty(length, out_like.dtype)


@elementwise
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
def apply_row_block(x, y, lo, hi, mean_c, a, b, act, stream):
    """Rows lo..hi-1 of the contiguous layout, one staging buffer for all of them."""
    if stream is not None:
        buf, out = stream_scratch(act, STREAM_SPAN, a, y)
        for r in range(lo, hi):
            apply_span_streamed(x[r], y[r], 0, x.shape[1], mean_c[r], a[r], b[r], act, buf, out)
        store_fence()
        return
    if act == NONE:
        apply_rows_none(x, y, lo, hi, mean_c, a, b)
        return
    buf = np.empty(BLOCK, a.dtype)
    for r in range(lo, hi):
        apply_span(x[r], y[r], 0, x.shape[1], mean_c[r], a[r], b[r], act, buf)


@njit(parallel=True, **JIT)
def apply_rows(x, y, mean_c, a, b, act, stream):
    """Contiguous layout. x, y: (N*C, HW); mean_c, a, b: (N*C,); stream: None, or
    True to write y with streaming stores (see streaming: a compile-time choice).

    Tasks are blocks of about PIXEL_CHUNK elements (whole rows), so small planes (HW = 64)
    do not pay a buffer allocation and a task start per row.
    """
    rows, length = x.shape
    per_task = max(1, PIXEL_CHUNK // max(length, 1))
    tasks = (rows + per_task - 1) // per_task
    for task in prange(tasks):
        lo = task * per_task
        apply_row_block(x, y, lo, min(lo + per_task, rows), mean_c, a, b, act, stream)


@njit(**JIT)
def stage_z1(xn, r0, rows, mc, an, bn, buf):
    """buf[j * C + c] = z1 = (x - mean) * A + B of pixel r0 + j, channel c, for an
    activation block. The forward's apply and both channels-last backward passes stage
    through this one definition (flags stated here, so every caller rounds z1 alike)."""
    channels = xn.shape[1]
    for j in range(rows):
        base = j * channels
        for c in range(channels):
            buf[base + c] = (load(xn, (r0 + j, c)) - mc[c]) * an[c] + bn[c]


@elementwise
@njit(**JIT)
def apply_pixels(xn, yn, lo, hi, mc, an, bn, act, buf):
    """Pixels lo..hi-1 of one channels-last sample xn, yn (HW, C) with its coefficient
    rows mc, an, bn (C,); buf: scratch of at least C values (activations only).

    A plain callee so LLVM vectorises it; 2-D indexing, no per-pixel views (each costs
    reference-count updates). With an activation, whole pixels are staged together,
    about BLOCK values per activate_block call (one call per pixel is slow for small C).
    """
    channels = xn.shape[1]
    if act == NONE:
        for r in range(lo, hi):
            for c in range(channels):
                store(yn, (r, c), (load(xn, (r, c)) - mc[c]) * an[c] + bn[c])
        return
    per = max(1, buf.shape[0] // channels)
    for r0 in range(lo, hi, per):
        rows = min(per, hi - r0)
        stage_z1(xn, r0, rows, mc, an, bn, buf)
        activate_block(buf, rows * channels, act)
        for j in range(rows):
            base = j * channels
            for c in range(channels):
                store(yn, (r0 + j, c), buf[base + c])


@njit(**JIT)
def apply_pixels_streamed(xn, yflat, lo, hi, mc, an, bn, act, buf, out):
    """apply_pixels for an output written with streaming stores: whole pixels computed
    into out (y's dtype, so the same rounding as a direct store), then streamed to
    yflat, the sample's y as (HW * C,). buf: float scratch as long as out (activations)."""
    channels = xn.shape[1]
    per = max(1, out.shape[0] // channels)
    for r0 in range(lo, hi, per):
        rows = min(per, hi - r0)
        if act == NONE:
            for j in range(rows):
                base = j * channels
                for c in range(channels):
                    store(out, base + c, (load(xn, (r0 + j, c)) - mc[c]) * an[c] + bn[c])
        else:
            stage_z1(xn, r0, rows, mc, an, bn, buf)
            activate_block(buf, rows * channels, act)
            for k in range(rows * channels):
                store(out, k, buf[k])
        stream_span(yflat, r0 * channels, out, rows * channels)
    store_fence()


@njit(**JIT)
def apply_pixel_task(x, y, n, lo, hi, mean_c, a, b, act, bufs, t, stream):
    """One task of apply_channels_last (scratch row t). The per-sample views are made
    here, in a plain callee, not in the prange body."""
    if stream is not None:
        buf, out = stream_scratch(act, max(STREAM_SPAN, x.shape[2]), a, y)
        apply_pixels_streamed(x[n], y[n].reshape(-1), lo, hi, mean_c[n], a[n], b[n], act, buf, out)
        return
    buf = bufs[0]
    if act != NONE:
        buf = bufs[t]
    apply_pixels(x[n], y[n], lo, hi, mean_c[n], a[n], b[n], act, buf)


@njit(parallel=True, **JIT)
def apply_channels_last(x, y, mean_c, a, b, act, stream):
    """Channels-last layout. x, y: (N, HW, C); mean_c, a, b: (N, C); stream: None,
    or True to write y with streaming stores (see streaming: a compile-time choice)."""
    n_batch, hw, channels = x.shape
    block_rows = max(1, PIXEL_CHUNK // channels)
    blocks = (hw + block_rows - 1) // block_rows
    tasks = n_batch * blocks
    bufs = activation_scratch(a, act, tasks, max(BLOCK, channels))
    for task in prange(tasks):
        n, lo, hi = task_pixels(task, blocks, block_rows, hw)
        apply_pixel_task(x, y, n, lo, hi, mean_c, a, b, act, bufs, task, stream)


@njit(parallel=True, **JIT)
def apply_after_stats(x, y, mean_c, a, b, act, stream, block_rows, threads):
    """apply_channels_last right after stats_channels_last: the statistics' tasks (n,
    block of block_rows pixels) in the same ``threads`` runs, each walked backwards, so
    each thread first rereads the blocks its statistics pass left in its L2
    (pixel_tasks.thread_run). Elementwise: the order never changes a value."""
    n_batch, hw, channels = x.shape
    blocks = (hw + block_rows - 1) // block_rows
    bufs = activation_scratch(a, act, threads, max(BLOCK, channels))
    for t in prange(threads):
        first, end = thread_run(n_batch * blocks, threads, t)
        apply_run_backwards(x, y, mean_c, a, b, act, bufs, t, stream, block_rows, blocks, first, end)


@njit(**JIT)
def apply_run_backwards(x, y, mean_c, a, b, act, bufs, t, stream, block_rows, blocks, first, end):
    """Tasks end-1 down to first of apply_after_stats (scratch row t)."""
    for i in range(end - first):
        n, lo, hi = task_pixels(end - 1 - i, blocks, block_rows, x.shape[1])
        apply_pixel_task(x, y, n, lo, hi, mean_c, a, b, act, bufs, t, stream)
