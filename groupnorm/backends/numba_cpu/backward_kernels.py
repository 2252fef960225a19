"""Backward of GroupNorm + epilogue without saved activations.

Derivation. With xhat = (x - mean) * rstd, z0 = xhat * w + b, z1 = z0 * (1 + s) + t and
y = act(z1):
    dz1   = dy * act'(z1)            z1 recomputed in registers as (x - mean) * A + B
    dxhat = dz1 * (1 + s) * w        so  rstd * dxhat = dz1 * A   (A = rstd * w * (1 + s))
The weight/bias/scale/shift gradients and the group sums all come from two per-(n, c)
sums over HW:  S1 = sum(dz1 * xhat) = rstd * sum(dz1 * (x - mean))  and  S0 = sum(dz1).
GroupNorm's input gradient, per group of `count` elements, is
    dx = rstd * (dxhat - sum_g(dxhat) / count - xhat * sum_g(dxhat * xhat) / count)
       = dz1 * A + (x - mean) * P + Q
with P = -rstd^2 * sum_g(dxhat * xhat) / count and Q = -rstd * sum_g(dxhat) / count (see
coefs.dx_coefs). The group sums are formed by the caller from S1, S0 (in torch, (N, C)
sized), so they can be all-reduced across ranks between the two kernels.

Determinism: contiguous rows are summed by one task each; channels-last sums are formed
per fixed block of pixels and merged in block order, independent of the thread count.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .activations import NONE, grad_block
from .apply_kernels import STREAM_SPAN, stage_z1, stream_scratch
from .elements import cast_like, load
from .fast_store import store_out as store   # elements.store's results, cheaper bf16
from .function_attributes import elementwise, out_of_line
from .lanes import LANES, clear, lanes_of, total
from .pixel_tasks import activation_scratch, task_pixels, thread_run
from .streaming import stream_span, store_fence

BLOCK = 512           # staging buffer length for act'(z1)
PIXEL_CHUNK = 32768   # channels-last: target elements per parallel task ...
PIXEL_ROWS_MIN = 16   # ... but at least this many pixels ...
PIXEL_ROWS_MAX = 512  # ... and at most this many (float32 per-channel partial sums)
SUM_BLOCK = 4096        # elements summed in the accumulation dtype before a float64 add
ROW_TASK_ELEMS = 16384  # contiguous layout: elements per parallel task (whole rows)
GROUP_BLOCK_ELEMS = 16384  # contiguous fused backward: a block of small groups per stage (fused_groups_run)
JIT = dict(cache=True, error_model="numpy", fastmath={"nsz"})
# No reassoc: it let LLVM regroup sums differently depending on the module a loop was
# compiled into, so the same kernel wrote other bits (1 ulp here and there) when compiled
# inside its caller than when loaded from the cache. Sums run in lanes (lanes.py).


@out_of_line
@njit(**JIT)
def dz_sums(db, xb, m, buf, zero):
    """(sum(g * (x - m)), sum(g)) over the elements of db, xb (zero-based views) in lanes,
    g = dy, or dy * buf[i] (act'(z1), staged by the caller) unless buf is None (a
    compile-time choice: Numba prunes the branch by the argument's type)."""
    n = xb.shape[0]
    s_xc = lanes_of(zero)
    s_dz = lanes_of(zero)
    full = n - n % LANES
    for i in range(0, full, LANES):
        for j in range(LANES):
            g = load(db, i + j)
            if buf is not None:
                g *= buf[i + j]
            s_xc[j] += g * (load(xb, i + j) - m)
            s_dz[j] += g
    if full < n:   # the partial block: masked lanes add exact zeros (unsigned: no gathers)
        tail = np.uint64(full)
        for j in range(LANES):
            inside = full + j < n
            g = load(db, tail + np.uint64(j)) if inside else zero
            if buf is not None:
                g *= buf[tail + np.uint64(j)] if inside else zero
            d = load(xb, tail + np.uint64(j)) - m if inside else zero
            s_xc[j] += g * d
            s_dz[j] += g
    return total(s_xc), total(s_dz)


@njit(**JIT)
def reduce_row(dr, xr, m, ar, br, act, zero):
    """(sum(dz1 * (x - mean)), sum(dz1)) over one (n, c) row. A plain callee, not a prange
    body: Numba's parallel lowering keeps LLVM from vectorising loop bodies.

    Sums run in the accumulation dtype within blocks of SUM_BLOCK elements and in float64
    across blocks: a float32 running sum over ~1e9 elements would stall (2^24 per lane)."""
    length = xr.shape[0]
    t_xc = 0.0
    t_dz = 0.0
    if act == NONE:
        for lo in range(0, length, SUM_BLOCK):
            count = min(SUM_BLOCK, length - lo)
            s_xc, s_dz = dz_sums(dr[lo:lo + count], xr[lo:lo + count], m, None, zero)
            t_xc += s_xc
            t_dz += s_dz
    else:
        buf = np.full(BLOCK, zero)
        for lo in range(0, length, BLOCK):
            count = min(BLOCK, length - lo)
            xb = xr[lo:lo + count]    # zero-based views vectorise (no wraparound check)
            for j in range(count):
                buf[j] = (load(xb, j) - m) * ar + br
            grad_block(buf, count, act)
            s_xc, s_dz = dz_sums(dr[lo:lo + count], xb, m, buf, zero)
            t_xc += s_xc
            t_dz += s_dz
    return t_xc, t_dz


@out_of_line
@njit(**JIT)
def reduce_rows_none(dy, x, lo, hi, mean_c, rstd_c, sum_dz_xhat, sum_dz, zero):
    """reduce_row_block without an activation, indexing the arrays directly: no per-row
    views (each costs reference-count updates, as much as a short row's work). Sums in
    lanes, as dz_sums."""
    length = x.shape[1]
    if length > SUM_BLOCK:   # long rows: blocked float64 totals (see reduce_row)
        for r in range(lo, hi):
            s_xc, s_dz = reduce_row(dy[r], x[r], mean_c[r], zero, zero, NONE, zero)
            sum_dz_xhat[r] = s_xc * rstd_c[r]
            sum_dz[r] = s_dz
        return
    full = length - length % LANES
    dy_flat = dy.reshape(-1)
    x_flat = x.reshape(-1)
    s_xc = lanes_of(zero)
    s_dz = lanes_of(zero)
    for r in range(lo, hi):
        m = mean_c[r]
        clear(s_xc)
        clear(s_dz)
        for i in range(0, full, LANES):
            for j in range(LANES):
                g = load(dy, (r, i + j))
                s_xc[j] += g * (load(x, (r, i + j)) - m)
                s_dz[j] += g
        if full < length:   # flat unsigned indices: masked loads, not gathers
            tail = np.uint64(r * length + full)
            for j in range(LANES):
                inside = full + j < length
                g = load(dy_flat, tail + np.uint64(j)) if inside else zero
                d = load(x_flat, tail + np.uint64(j)) - m if inside else zero
                s_xc[j] += g * d
                s_dz[j] += g
        sum_dz_xhat[r] = total(s_xc) * rstd_c[r]
        sum_dz[r] = total(s_dz)


@njit(**JIT)
def reduce_row_block(dy, x, lo, hi, mean_c, rstd_c, a, b, act, sum_dz_xhat, sum_dz, zero):
    """Rows lo..hi-1 of reduce_rows, in a plain callee."""
    if act == NONE:
        reduce_rows_none(dy, x, lo, hi, mean_c, rstd_c, sum_dz_xhat, sum_dz, zero)
        return
    for r in range(lo, hi):
        s_xc, s_dz = reduce_row(dy[r], x[r], mean_c[r], a[r], b[r], act, zero)
        sum_dz_xhat[r] = s_xc * rstd_c[r]
        sum_dz[r] = s_dz


@njit(cache=True, error_model="numpy", fastmath=False)
def rows_per_task(length):
    """Whole rows per parallel task, about ROW_TASK_ELEMS elements: a prange iteration
    costs tens of nanoseconds, as much as a 64-element row's work."""
    return max(1, ROW_TASK_ELEMS // max(length, 1))


@njit(parallel=True, **JIT)
def reduce_rows(dy, x, mean_c, rstd_c, a, b, act, sum_dz_xhat, sum_dz, zero):
    """Contiguous layout. dy, x: (N*C, HW); coefficients and outputs: (N*C,).
    Each row's sums are formed by one call in a fixed order (any blocking of rows into
    tasks gives the same bits)."""
    rows, length = x.shape
    per_task = rows_per_task(length)
    for task in prange((rows + per_task - 1) // per_task):
        lo = task * per_task
        reduce_row_block(dy, x, lo, min(lo + per_task, rows), mean_c, rstd_c, a, b, act,
                         sum_dz_xhat, sum_dz, zero)


@njit(**JIT)   # one accumulator per channel: vectorises without reassociation
def reduce_pixels(dyn, xn, lo, hi, mc, an, bn, act, acc_xc, acc_dz, buf, zero):
    """Per-channel (sum dz1 * (x - mean), sum dz1) over pixels lo..hi-1 of one sample
    (HW, C), into acc_xc / acc_dz (C,); buf: scratch of at least C values (activations
    only). A plain callee so the C loops vectorise; 2-D indexing, no per-pixel views
    (each costs reference-count updates). With an activation, whole pixels are staged
    together, about BLOCK values per grad_block call (one call per pixel is slow for
    small C)."""
    channels = xn.shape[1]
    for c in range(channels):
        acc_xc[c] = zero
        acc_dz[c] = zero
    if act == NONE:
        for r in range(lo, hi):
            for c in range(channels):
                g = load(dyn, (r, c))
                acc_xc[c] += g * (load(xn, (r, c)) - mc[c])
                acc_dz[c] += g
        return
    per = max(1, buf.shape[0] // channels)
    for r0 in range(lo, hi, per):
        rows = min(per, hi - r0)
        stage_z1(xn, r0, rows, mc, an, bn, buf)
        grad_block(buf, rows * channels, act)
        for j in range(rows):
            base = j * channels
            for c in range(channels):
                g = load(dyn, (r0 + j, c)) * buf[base + c]
                acc_xc[c] += g * (load(xn, (r0 + j, c)) - mc[c])
                acc_dz[c] += g


@njit(cache=True, error_model="numpy", fastmath=False)
def pixel_rows(channels):
    """Pixels per channels-last backward task: a function of C only (determinism)."""
    return min(PIXEL_ROWS_MAX, max(PIXEL_ROWS_MIN, PIXEL_CHUNK // channels))


@njit(**JIT)
def reduce_pixel_run(dy, x, first, end, blocks, block_rows, mean_c, a, b, act, part_xc, part_dz, bufs, t, zero):
    """Tasks first..end-1 of reduce_channels_last in order (one thread's run; partial
    row = task, scratch row t). The views are made here, in a plain callee, not in the
    prange body."""
    buf = bufs[0]
    if act != NONE:
        buf = bufs[t]
    for task in range(first, end):
        n, lo, hi = task_pixels(task, blocks, block_rows, x.shape[1])
        reduce_pixels(dy[n], x[n], lo, hi, mean_c[n], a[n], b[n], act, part_xc[task], part_dz[task], buf, zero)


@njit(parallel=True, **JIT)
def reduce_channels_last(dy, x, mean_c, rstd_c, a, b, act, sum_dz_xhat, sum_dz, zero, threads):
    """Channels-last layout. dy, x: (N, HW, C); coefficients and outputs: (N, C).

    Per (n, block of pixels) partial sums in the accumulation dtype, the blocking a
    function of the shape only, then summed in block order in float64. The tasks run in
    ``threads`` contiguous runs (pixel_tasks.thread_run), which dx_channels_last then
    walks backwards."""
    n_batch, hw, channels = x.shape
    block_rows = pixel_rows(channels)
    blocks = (hw + block_rows - 1) // block_rows
    tasks = n_batch * blocks
    part_xc = np.empty((tasks, channels), a.dtype)
    part_dz = np.empty((tasks, channels), a.dtype)
    bufs = activation_scratch(a, act, threads, max(BLOCK, channels))
    for t in prange(threads):
        first, end = thread_run(tasks, threads, t)
        reduce_pixel_run(dy, x, first, end, blocks, block_rows, mean_c, a, b, act, part_xc, part_dz, bufs, t,
                         zero)
    for n in range(n_batch):
        merge_blocks(part_xc, part_dz, n * blocks, blocks, rstd_c, n, sum_dz_xhat, sum_dz)


@njit(**JIT)
def merge_blocks(part_xc, part_dz, first, blocks, rstd_c, n, out_xc, out_dz):
    """Partial rows first..first+blocks-1 (sample n's blocks) summed in block order
    (fixed) in float64, then scaled by rstd: out_*[n]."""
    channels = part_xc.shape[1]
    tot_xc = np.zeros(channels, np.float64)   # float64 across blocks: no stall at large HW
    tot_dz = np.zeros(channels, np.float64)
    for k in range(first, first + blocks):
        for c in range(channels):
            tot_xc[c] += part_xc[k, c]
            tot_dz[c] += part_dz[k, c]
    for c in range(channels):
        out_xc[n, c] = tot_xc[c] * rstd_c[n, c]
        out_dz[n, c] = tot_dz[c]


@njit(**JIT)
def dx_row(dr, xr, out, m, ar, br, pr, qr, act):
    """dx over one (n, c) row (a plain callee so it vectorises)."""
    length = xr.shape[0]
    if act == NONE:
        for i in range(length):
            store(out, i, load(dr, i) * ar + (load(xr, i) - m) * pr + qr)
    else:
        buf = np.full(BLOCK, ar)
        for lo in range(0, length, BLOCK):
            count = min(BLOCK, length - lo)
            xb = xr[lo:lo + count]
            db = dr[lo:lo + count]
            ob = out[lo:lo + count]
            for j in range(count):
                buf[j] = (load(xb, j) - m) * ar + br
            grad_block(buf, count, act)
            for j in range(count):
                store(ob, j, load(db, j) * buf[j] * ar + (load(xb, j) - m) * pr + qr)


@njit(**JIT)
def dx_row_streamed(dr, xr, out_row, m, ar, br, pr, qr, act, buf, out):
    """dx_row for an output written with streaming stores (see streaming): each piece
    of up to out.size values is computed into out (dx's dtype, the same rounding as a
    direct store) and streamed to out_row. buf: float scratch as long as out (activations)."""
    length = xr.shape[0]
    span = out.shape[0]
    for lo in range(0, length, span):
        count = min(span, length - lo)
        xb = xr[lo:lo + count]
        db = dr[lo:lo + count]
        if act == NONE:
            for j in range(count):
                store(out, j, load(db, j) * ar + (load(xb, j) - m) * pr + qr)
        else:
            for j in range(count):
                buf[j] = (load(xb, j) - m) * ar + br
            grad_block(buf, count, act)
            for j in range(count):
                store(out, j, load(db, j) * buf[j] * ar + (load(xb, j) - m) * pr + qr)
        stream_span(out_row, lo, out, count)


@elementwise
@njit(**JIT)
def dx_rows_none(dy, x, dx, lo, hi, mean_c, a, p, q):
    """dx_row_block without an activation, 2-D indexing (no per-row views)."""
    length = x.shape[1]
    for r in range(lo, hi):
        m = mean_c[r]
        ar = a[r]
        pr = p[r]
        qr = q[r]
        for i in range(length):
            store(dx, (r, i), load(dy, (r, i)) * ar + (load(x, (r, i)) - m) * pr + qr)


@njit(**JIT)
def dx_row_block(dy, x, dx, lo, hi, mean_c, a, b, p, q, act, stream):
    if stream is not None:
        buf, out = stream_scratch(act, STREAM_SPAN, a, dx)
        for r in range(lo, hi):
            dx_row_streamed(dy[r], x[r], dx[r], mean_c[r], a[r], b[r], p[r], q[r], act, buf, out)
        store_fence()
        return
    if act == NONE:
        dx_rows_none(dy, x, dx, lo, hi, mean_c, a, p, q)
        return
    for r in range(lo, hi):
        dx_row(dy[r], x[r], dx[r], mean_c[r], a[r], b[r], p[r], q[r], act)


@njit(parallel=True, **JIT)
def dx_rows(dy, x, dx, mean_c, a, b, p, q, act, stream):
    """Contiguous layout. dy, x, dx: (N*C, HW); coefficients: (N*C,); stream: None, or
    True to write dx with streaming stores (see streaming: a compile-time choice)."""
    rows, length = x.shape
    per_task = rows_per_task(length)
    for task in prange((rows + per_task - 1) // per_task):
        lo = task * per_task
        dx_row_block(dy, x, dx, lo, min(lo + per_task, rows), mean_c, a, b, p, q, act, stream)


@elementwise
@njit(**JIT)
def dx_pixels(dyn, xn, dxn, lo, hi, mc, an, bn, pn, qn, act, buf):
    """dx over pixels lo..hi-1 of one sample (HW, C); a plain callee so it vectorises;
    activations staged as in reduce_pixels."""
    channels = xn.shape[1]
    if act == NONE:
        for r in range(lo, hi):
            for c in range(channels):
                store(dxn, (r, c), load(dyn, (r, c)) * an[c] + (load(xn, (r, c)) - mc[c]) * pn[c] + qn[c])
        return
    per = max(1, buf.shape[0] // channels)
    for r0 in range(lo, hi, per):
        rows = min(per, hi - r0)
        stage_z1(xn, r0, rows, mc, an, bn, buf)
        grad_block(buf, rows * channels, act)
        for j in range(rows):
            base = j * channels
            for c in range(channels):
                store(dxn, (r0 + j, c), load(dyn, (r0 + j, c)) * buf[base + c] * an[c]
                      + (load(xn, (r0 + j, c)) - mc[c]) * pn[c] + qn[c])


@njit(**JIT)
def dx_pixels_streamed(dyn, xn, dx_flat, lo, hi, mc, an, bn, pn, qn, act, buf, out):
    """dx_pixels for an output written with streaming stores: whole pixels computed into
    out (dx's dtype), then streamed to dx_flat, the sample's dx as (HW * C,)."""
    channels = xn.shape[1]
    per = max(1, out.shape[0] // channels)
    for r0 in range(lo, hi, per):
        rows = min(per, hi - r0)
        if act == NONE:
            for j in range(rows):
                base = j * channels
                for c in range(channels):
                    store(out, base + c, load(dyn, (r0 + j, c)) * an[c]
                          + (load(xn, (r0 + j, c)) - mc[c]) * pn[c] + qn[c])
        else:
            stage_z1(xn, r0, rows, mc, an, bn, buf)
            grad_block(buf, rows * channels, act)
            for j in range(rows):
                base = j * channels
                for c in range(channels):
                    store(out, base + c, load(dyn, (r0 + j, c)) * buf[base + c] * an[c]
                          + (load(xn, (r0 + j, c)) - mc[c]) * pn[c] + qn[c])
        stream_span(dx_flat, r0 * channels, out, rows * channels)
    store_fence()


@njit(**JIT)
def dx_pixel_task(dy, x, dx, n, lo, hi, mean_c, a, b, p, q, act, bufs, t, stream):
    """One task of dx_channels_last (scratch row t); views made once per task."""
    if stream is not None:
        buf, out = stream_scratch(act, max(STREAM_SPAN, x.shape[2]), a, dx)
        dx_pixels_streamed(dy[n], x[n], dx[n].reshape(-1), lo, hi, mean_c[n], a[n], b[n], p[n], q[n], act,
                           buf, out)
        return
    buf = bufs[0]
    if act != NONE:
        buf = bufs[t]
    dx_pixels(dy[n], x[n], dx[n], lo, hi, mean_c[n], a[n], b[n], p[n], q[n], act, buf)


@njit(parallel=True, **JIT)
def dx_channels_last(dy, x, dx, mean_c, a, b, p, q, act, stream, threads):
    """Channels-last layout. dy, x, dx: (N, HW, C); coefficients: (N, C); stream: None,
    or True to write dx with streaming stores (see streaming: a compile-time choice).
    reduce_channels_last's tasks in the same ``threads`` runs, each walked backwards:
    a thread first rereads what its reduce left in its L2 (pixel_tasks.thread_run)."""
    n_batch, hw, channels = x.shape
    block_rows = pixel_rows(channels)
    blocks = (hw + block_rows - 1) // block_rows
    bufs = activation_scratch(a, act, threads, max(BLOCK, channels))
    for t in prange(threads):
        first, end = thread_run(n_batch * blocks, threads, t)
        dx_run_backwards(dy, x, dx, first, end, blocks, block_rows, mean_c, a, b, p, q, act, bufs, t, stream)


@njit(**JIT)
def dx_run_backwards(dy, x, dx, first, end, blocks, block_rows, mean_c, a, b, p, q, act, bufs, t, stream):
    """Tasks end-1 down to first of dx_channels_last (scratch row t)."""
    for i in range(end - first):
        n, lo, hi = task_pixels(end - 1 - i, blocks, block_rows, x.shape[1])
        dx_pixel_task(dy, x, dx, n, lo, hi, mean_c, a, b, p, q, act, bufs, t, stream)


@njit(**JIT)
def group_dx_terms(lo, hi, count, rstd_c, gain, sum_dz_xhat, sum_dz, p, q):
    """p, q of rows lo..hi-1 (one group) from its per-row sums, in float64 like
    coefs.dx_coefs."""
    s_dxhat = 0.0
    s_dxhat_xhat = 0.0
    for r in range(lo, hi):
        s_dxhat += np.float64(sum_dz[r]) * gain[r]
        s_dxhat_xhat += np.float64(sum_dz_xhat[r]) * gain[r]
    rs = np.float64(rstd_c[lo])
    inv_count = 1.0 / max(count, 1)
    pg = -rs * rs * s_dxhat_xhat * inv_count
    qg = -rs * s_dxhat * inv_count
    for r in range(lo, hi):
        p[r] = pg
        q[r] = qg


@njit(**JIT)
def fused_groups_run(dy, x, dx, first, end, per, cpg, mean_c, rstd_c, a, b, gain, act, sum_dz_xhat, sum_dz,
                     need_dx, p, q, zero, stream):
    """Groups first..end-1 of backward_fused_rows (rows first * cpg ..), ``per`` groups
    at a time: the per-(n, c) sums of the block's rows exactly as reduce_rows forms them
    (each row by itself), each group's dx terms, then dx while the block (at most
    GROUP_BLOCK_ELEMS elements of each input) is warm in cache.

    Why blocks: as in the forward (forward_kernels.groups_run), a small group's dx waits
    on a chain of dependent sums; the sums of a block's groups are independent, so the
    core overlaps them, and a block costs one call per stage instead of one per group."""
    count = cpg * x.shape[1]
    for lo in range(first, end, per):
        hi = min(lo + per, end)
        reduce_row_block(dy, x, lo * cpg, hi * cpg, mean_c, rstd_c, a, b, act, sum_dz_xhat, sum_dz, zero)
        if need_dx:
            for grp in range(lo, hi):
                group_dx_terms(grp * cpg, (grp + 1) * cpg, count, rstd_c, gain, sum_dz_xhat, sum_dz, p, q)
            dx_row_block(dy, x, dx, lo * cpg, hi * cpg, mean_c, a, b, p, q, act, stream)


@njit(parallel=True, **JIT)
def backward_fused_rows(dy, x, dx, cpg, mean_c, rstd_c, a, b, gain, act, sum_dz_xhat, sum_dz,
                        need_dx, zero, stream, threads):
    """Contiguous layout, per-(n, g) tasks (cpg consecutive rows) in ``threads``
    contiguous runs (pixel_tasks.thread_run). dy, x, dx: (N*C, HW); mean_c, rstd_c, a,
    b, gain (= w * (1 + s), float64) and the outputs: (N*C,).

    The result does not depend on the thread count or the blocking: each row's sums are
    formed by themselves, each group's terms in a fixed order.
    """
    rows, length = x.shape
    p = np.empty(rows, a.dtype)
    q = np.empty(rows, a.dtype)
    groups = rows // cpg
    per = max(1, GROUP_BLOCK_ELEMS // (cpg * length))
    for t in prange(threads):
        first, end = thread_run(groups, threads, t)
        fused_groups_run(dy, x, dx, first, end, per, cpg, mean_c, rstd_c, a, b, gain, act, sum_dz_xhat, sum_dz,
                         need_dx, p, q, zero, stream)
