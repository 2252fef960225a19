"""torch <-> Numba glue: zero-copy views, output allocation, dispatch by memory format.

Tensors are never copied. The hot calls (forward, the whole backward) pass them as raw
addresses to the entries in ``addresses`` (a numpy view costs ~2 us per tensor); the other
contract functions view them with ``numpy_views`` (half types as their bits).
Contiguous inputs become (N*C, HW) / (N*G, C/G*HW) rows, channels-last inputs
(N, HW, C); outputs are allocated like x, so they keep its memory format.
"""
from __future__ import annotations

import numpy as np
import torch

from . import alloc, streaming
from .activations import CODES
from .backward_kernels import dx_channels_last, dx_rows, reduce_channels_last, reduce_rows
from .coefs import dx_coefs, z1_coefs
from .apply_kernels import apply_channels_last, apply_rows
from .addresses import (WITNESS, backward_channels_last_at, backward_groups_at, backward_rows_at,
                        backward_samples_at, forward_groups_at, forward_pixel_blocks_at, forward_rows_at,
                        forward_samples_at, tensor_at)
from .forward_kernels import GROUP_TASKS_MIN, channels_last_per_sample
from .numpy_views import HALF, as_numpy, pixels_view
from .stats_kernels import stats_channels_last, stats_rows
from . import threads as pool
from .threads import sync_with_torch

_EMPTY = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64)}
_ZERO = {torch.float32: np.float32(0.0), torch.float64: np.float64(0.0)}
_NUMPY_ACC = {torch.float32: np.float32, torch.float64: np.float64}


# The accumulation dtype of each input dtype (float64 for float64, else float32).
_ACC = {torch.float32: torch.float32, torch.float64: torch.float64,
        torch.bfloat16: torch.float32, torch.float16: torch.float32}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return _ACC[dtype]


def is_channels_last(x: torch.Tensor) -> bool:
    """Contiguous wins when both hold (C == 1 or HW == 1): then the layouts coincide."""
    return not x.is_contiguous()


def spatial_size(x: torch.Tensor) -> int:
    hw = 1
    for s in x.shape[2:]:
        hw *= int(s)
    return hw


def rows_view(x: torch.Tensor, rows: int) -> np.ndarray:
    """Contiguous x as (rows, numel / rows)."""
    return as_numpy(x).reshape(rows, -1)


def param_tensor(t, acc: torch.dtype):
    """weight/bias/scale/shift as the kernels read them: contiguous, in the accumulation
    dtype or a half type (read as bits); None stays None."""
    if t is None:
        return None
    if t.dtype != acc and t.dtype not in HALF:
        t = t.to(acc)
    return t if t.is_contiguous() else t.contiguous()


def param(t, acc: torch.dtype) -> np.ndarray:
    """weight/bias (C,) or scale/shift (N, C) as a flat array: the accumulation dtype's
    values, or a half type's raw bits (the kernels read them through ``elements.load``; a
    ``.to(float32)`` per parameter per call was ~15 us of the small shapes' glue)."""
    if t is None:
        return _EMPTY[acc]
    a = as_numpy(param_tensor(t, acc))
    return a if a.ndim == 1 else a.reshape(-1)


def stat_tensor(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """mean / rstd (N, G) as the kernels read them: contiguous, in the accumulation dtype."""
    if t.dtype != acc:
        t = t.to(acc)
    return t if t.is_contiguous() else t.contiguous()


def stat(t: torch.Tensor, acc: torch.dtype) -> np.ndarray:
    return stat_tensor(t, acc).numpy(force=True)


_ABSENT = {acc: (0, 0, WITNESS[acc]) for acc in _ZERO}


def _at(t, acc: torch.dtype):
    """(address, element count, witness) of an output vector (dweight, dbias) as
    allocated; absent: 0 elements."""
    if t is None:
        return _ABSENT[acc]
    return tensor_at(t)


def _param_at(t, acc: torch.dtype, keep: list):
    """(address, element count, witness) of weight/bias/scale/shift as the kernels read
    them (see param_tensor); absent: 0 elements. A converted copy goes into keep, which
    the caller holds until the entry has run. One Python call per parameter, not three:
    right after a kernel has run, each Python call costs ~3x its isolated time (measured:
    the glue of a 2x1280x8x8 forward is ~5 us alone, 20-28 us between kernel calls)."""
    if t is None:
        return _ABSENT[acc]
    if (t.dtype != acc and t.dtype not in HALF) or not t.is_contiguous():
        t = param_tensor(t, acc)
        keep.append(t)
    return t.data_ptr(), t.numel(), WITNESS[t.dtype]


def forward(x, weight, bias, scale, shift, num_groups, eps, activation):
    n = x.shape[0]
    acc = acc_dtype(x.dtype)
    mean, mean_np = alloc.empty_pair((n, num_groups), acc)
    rstd, rstd_np = alloc.empty_pair((n, num_groups), acc)
    y = _forward_into(x, weight, bias, scale, shift, num_groups, eps, activation, mean_np, rstd_np)
    return y, mean, rstd


def forward_output(x, weight, bias, scale, shift, num_groups, eps, activation):
    """forward's y alone, for a call nothing differentiates (inference): the statistics go
    to a numpy scratch that is never wrapped as tensors (two ``torch.from_numpy`` and an
    allocation less, a few microseconds of a small shape's call). An optional extension
    of the backend contract, like backward_fused."""
    acc = acc_dtype(x.dtype)
    stats = np.empty((2, x.shape[0], num_groups), _NUMPY_ACC[acc])
    return _forward_into(x, weight, bias, scale, shift, num_groups, eps, activation, stats[0], stats[1])


def forward_known(x, shape, dtype, numel, channels_last, weight, bias, num_groups, eps, activation):
    """forward_output for a call whose facts the caller has already read (``everyday``):
    x's shape, dtype, element count and layout (True: channels-last), no scale/shift.
    The same kernels and bits as forward_output; the facts are not asked of x again
    (each tensor attribute costs microseconds right after a large kernel). An optional
    extension of the backend contract, like forward_known_stats and backward_known."""
    stats = np.empty((2, shape[0], num_groups), _NUMPY_ACC[_ACC[dtype]])
    return _forward_known(x, shape, dtype, numel, channels_last, weight, bias, None, None, num_groups, eps, activation,
                          stats[0], stats[1])[0]


def forward_known_stats(x, shape, dtype, numel, channels_last, weight, bias, num_groups, eps, activation):
    """forward_known for a call that will be differentiated -> (y, stats, address): stats
    is a numpy (2, N, G) array of mean and rstd in the accumulation dtype, never wrapped
    as tensors, and address its memory's; backward_known reads both back (keep stats
    alive while the address is in use)."""
    stats = np.empty((2, shape[0], num_groups), _NUMPY_ACC[_ACC[dtype]])
    y, address = _forward_known(x, shape, dtype, numel, channels_last, weight, bias, None, None, num_groups, eps,
                                activation, stats[0], stats[1])
    return y, stats, address


def _forward_known(x, shape, dtype, numel, channels_last, weight, bias, scale, shift, num_groups, eps, activation,
                   mean_np, rstd_np):
    """The forward of every launcher function -> (y, mean_np's address): statistics
    written into mean_np, rstd_np ((N, G) arrays), x's facts given."""
    acc = _ACC[dtype]
    n, c = shape[0], shape[1]
    threads = sync_with_torch(numel, n * c)
    itemsize = dtype.itemsize
    y = alloc.output_known(x, shape, dtype, numel * itemsize, channels_last)
    stream = streams_known(numel, itemsize, channels_last)
    hw = numel // (n * c)
    if channels_last:
        if channels_last_per_sample(n, hw * c, threads):
            entry, stream = forward_samples_at, None   # small samples: never streamed
        else:
            entry = forward_pixel_blocks_at
    else:
        entry = forward_groups_at if n * num_groups >= GROUP_TASKS_MIN else forward_rows_at
    keep = []   # converted parameters, alive until the entry has run
    absent = _ABSENT[acc]   # scale / shift are None on every everyday call: no call to ask
    with pool.LOCK:   # see threads: workqueue takes one caller at a time
        address = entry(x.data_ptr(), y.data_ptr(), WITNESS[dtype], n, c, hw, *_param_at(weight, acc, keep),
                        *_param_at(bias, acc, keep), *(absent if scale is None else _param_at(scale, acc, keep)),
                        *(absent if shift is None else _param_at(shift, acc, keep)), eps, CODES[activation],
                        _ZERO[acc], mean_np, rstd_np, stream, threads)
    return y, address


_LAYOUT_OF = {4: torch.channels_last, 5: torch.channels_last_3d}
_STAT_BYTES = {acc: zero.itemsize for acc, zero in _ZERO.items()}


def backward_known(dy, x, stats, stats_at, weight, bias, shape, dtype, numel, channels_last, num_groups,
                   activation, need_dx, need_weight, need_bias):
    """The backward of a forward_known_stats call -> (dx, dweight, dbias), None where not
    needed: the same compiled entries and bits as backward_grads, with x's facts and the
    statistics (``stats`` and its address, as forward_known_stats returned them) handed
    in instead of asked again. dy: the gradient of y (y's dtype; any strides)."""
    acc = _ACC[dtype]
    n, c = shape[0], shape[1]
    threads = sync_with_torch(numel, n * c)
    hw = numel // (n * c)
    if channels_last:   # (3-D channels-last-like strides have no memory format: compare strides)
        layout = _LAYOUT_OF.get(len(shape))
        same = dy.is_contiguous(memory_format=layout) if layout is not None else dy.stride() == x.stride()
    else:
        same = dy.is_contiguous()
    if not same:
        dy = like_layout(dy, x)
    sums = np.empty((2, n, c), _NUMPY_ACC[acc])
    itemsize = dtype.itemsize
    dx = alloc.output_known(x, shape, dtype, numel * itemsize, channels_last) if need_dx else None
    dw = alloc.empty_like(weight) if need_weight else None
    db = alloc.empty_like(bias) if need_bias else None
    entry, stream = _backward_entry(n, c, hw, num_groups, channels_last, threads, numel, itemsize, need_dx)
    keep = []
    absent = _ABSENT[acc]
    with pool.LOCK:   # see threads: workqueue takes one caller at a time
        entry(dy.data_ptr(), x.data_ptr(), (x if dx is None else dx).data_ptr(), WITNESS[dtype], n, c, hw,
              bool(need_dx), stream, stats_at,
              stats_at + _STAT_BYTES[acc] * n * num_groups, WITNESS[acc], num_groups, *_param_at(weight, acc, keep),
              *_param_at(bias, acc, keep), *absent, *absent, CODES[activation], _ZERO[acc], sums[0], sums[1],
              *_at(dw, acc), *_at(db, acc), threads)
    if dx is not None and numel == n * num_groups:
        one_element_groups(dx, dy, x, torch.from_numpy(stats[1]), weight)
    return dx, dw, db


def _forward_into(x, weight, bias, scale, shift, num_groups, eps, activation, mean_np, rstd_np):
    """y of the forward, the statistics written into mean_np, rstd_np ((N, G) arrays)."""
    return _forward_known(x, x.shape, x.dtype, x.numel(), is_channels_last(x), weight, bias, scale, shift,
                          num_groups, float(eps), activation, mean_np, rstd_np)[0]


def streams(numel: int, x, channels_last: bool, backward: bool = False):
    """The kernels' ``stream`` argument for an output like x with numel elements (y, or
    dx when backward): True to write it with streaming stores (large float32/float64
    outputs), else None, which compiles no streamed code (see streaming; the limits are
    read at call time, so tests can lower them)."""
    return streams_known(numel, x.itemsize, channels_last, backward)


def streams_known(numel: int, size: int, channels_last: bool, backward: bool = False):
    """streams() for an element size the caller has already read."""
    if not streaming.STREAMS or size < streaming.STREAM_MIN_ITEMSIZE:
        return None
    if backward:
        least = streaming.STREAM_MIN_BYTES_BACKWARD
    else:
        least = streaming.STREAM_MIN_BYTES_CHANNELS_LAST if channels_last else streaming.STREAM_MIN_BYTES
    return True if numel * size >= least else None


def stats(x, num_groups):
    threads = sync_with_torch(x.numel())
    n = x.shape[0]
    acc = acc_dtype(x.dtype)
    mean = alloc.empty((n, num_groups), acc)
    m2 = alloc.empty((n, num_groups), acc)
    if is_channels_last(x):
        with pool.LOCK:   # see threads: workqueue takes one caller at a time
            stats_channels_last(pixels_view(x), num_groups, mean.numpy(), m2.numpy(), _ZERO[acc], threads)
    else:
        with pool.LOCK:   # see threads: workqueue takes one caller at a time
            stats_rows(rows_view(x, n * num_groups), mean.view(-1).numpy(), m2.view(-1).numpy(), _ZERO[acc])
    return mean, m2


def _coefs(x, mean, rstd, weight, bias, scale, shift):
    acc = acc_dtype(x.dtype)
    return z1_coefs(stat(mean, acc), stat(rstd, acc), param(weight, acc), param(bias, acc),
                    param(scale, acc), param(shift, acc), x.shape[1])


def apply(x, mean, rstd, weight, bias, scale, shift, num_groups, activation):
    sync_with_torch(x.numel())
    n, c = x.shape[0], x.shape[1]
    channels_last = is_channels_last(x)
    y, y_flat = alloc.output_like(x, channels_last)
    mean_c, _, a, b = _coefs(x, mean, rstd, weight, bias, scale, shift)
    act = CODES[activation]
    stream = streams(x.numel(), x, channels_last)
    if channels_last:
        with pool.LOCK:   # see threads: workqueue takes one caller at a time
            apply_channels_last(pixels_view(x), y_flat.reshape(n, -1, c), mean_c, a, b, act, stream)
    else:
        with pool.LOCK:   # see threads: workqueue takes one caller at a time
            apply_rows(rows_view(x, n * c), y_flat.reshape(n * c, -1), mean_c.reshape(-1), a.reshape(-1),
                       b.reshape(-1), act, stream)
    return y


def backward_reduce(dy, x, mean, rstd, weight, bias, scale, shift, num_groups, activation):
    threads = sync_with_torch(x.numel())
    n, c = x.shape[0], x.shape[1]
    acc = acc_dtype(x.dtype)
    sum_dz_xhat = alloc.empty((n, c), acc)
    sum_dz = alloc.empty((n, c), acc)
    mean_c, rstd_c, a, b = _coefs(x, mean, rstd, weight, bias, scale, shift)
    act = CODES[activation]
    if is_channels_last(x):
        dy = like_layout(dy, x)
        with pool.LOCK:   # see threads: workqueue takes one caller at a time
            reduce_channels_last(pixels_view(dy), pixels_view(x), mean_c, rstd_c, a, b, act,
                                 sum_dz_xhat.numpy(), sum_dz.numpy(), _ZERO[acc], threads)
    else:
        dy = like_layout(dy, x)
        with pool.LOCK:   # see threads: workqueue takes one caller at a time
            reduce_rows(rows_view(dy, n * c), rows_view(x, n * c), mean_c.reshape(-1), rstd_c.reshape(-1),
                        a.reshape(-1), b.reshape(-1), act, sum_dz_xhat.view(-1).numpy(),
                        sum_dz.view(-1).numpy(), _ZERO[acc])
    return sum_dz_xhat, sum_dz


def backward_dx(dy, x, mean, rstd, weight, bias, scale, shift, sum_dxhat, sum_dxhat_xhat,
                count, num_groups, activation):
    threads = sync_with_torch(x.numel())
    n, c = x.shape[0], x.shape[1]
    acc = acc_dtype(x.dtype)
    channels_last = is_channels_last(x)
    dx, dx_flat = alloc.output_like(x, channels_last)
    mean_c, _, a, b = _coefs(x, mean, rstd, weight, bias, scale, shift)
    p, q = dx_coefs(stat(rstd, acc), stat(sum_dxhat, acc), stat(sum_dxhat_xhat, acc), int(count), c)
    act = CODES[activation]
    dy = like_layout(dy, x)
    stream = streams(x.numel(), x, channels_last, backward=True)
    if channels_last:
        with pool.LOCK:   # see threads: workqueue takes one caller at a time
            dx_channels_last(pixels_view(dy), pixels_view(x), dx_flat.reshape(n, -1, c), mean_c, a, b, p, q, act,
                             stream, threads)
    else:
        with pool.LOCK:   # see threads: workqueue takes one caller at a time
            dx_rows(rows_view(dy, n * c), rows_view(x, n * c), dx_flat.reshape(n * c, -1), mean_c.reshape(-1),
                    a.reshape(-1), b.reshape(-1), p.reshape(-1), q.reshape(-1), act, stream)
    if int(count) == 1:
        one_element_groups(dx, dy, x, rstd, weight)
    return dx


def backward_fused(dy, x, mean, rstd, weight, bias, scale, shift, num_groups, activation,
                   need_dx=True):
    """backward_reduce and backward_dx in one call, for the single-process backward:
    -> (sum_dz_xhat, sum_dz, dx or None).

    An optional extension of the backend contract (not one of the five functions): the
    op layer may call it when no all-reduce sits between the two stages. One compiled entry
    (see entries) forms the coefficients and runs the kernels: contiguous x with enough
    groups runs per-(n, g) tasks (the sums, then dx while the group is still in cache; small
    groups a block at a time); other layouts run the two stages back to back. Group terms
    are formed in float64.
    """
    return _backward(dy, x, mean, rstd, weight, bias, scale, shift, num_groups, activation, need_dx,
                     False)[:3]


def backward_grads(dy, x, mean, rstd, weight, bias, scale, shift, num_groups, activation, need_dx=True):
    """The whole single-process backward -> (dx, dweight, dbias, dscale, dshift), None for
    each absent input. Another optional extension: without scale/shift, dweight and dbias
    are summed over N (in float64) inside the same compiled call."""
    modulated = scale is not None or shift is not None
    s1, s0, dx, dw, db = _backward(dy, x, mean, rstd, weight, bias, scale, shift, num_groups, activation,
                                   need_dx, not modulated)
    if modulated:
        from ...grad_terms import param_grads

        return (dx,) + tuple(param_grads(s1, s0, weight, bias, scale, shift))
    return dx, dw, db, None, None


def _backward_entry(n, c, hw, num_groups, channels_last, threads, numel, itemsize, need_dx):
    """(entry, stream) of a whole backward: the addresses entry for the layout and size,
    and its stream argument (see streams_known; None where dx is not written)."""
    stream = streams_known(numel, itemsize, channels_last, True) if need_dx else None
    if channels_last:
        if channels_last_per_sample(n, hw * c, threads):
            return backward_samples_at, None   # small samples: never streamed
        return backward_channels_last_at, stream
    return (backward_groups_at if n * num_groups >= GROUP_TASKS_MIN else backward_rows_at), stream


def _backward(dy, x, mean, rstd, weight, bias, scale, shift, num_groups, activation, need_dx, param_sums):
    shape = x.shape
    n, c = shape[0], shape[1]
    numel = x.numel()
    threads = sync_with_torch(numel, n * c)
    hw = numel // (n * c)
    acc = acc_dtype(x.dtype)
    if param_sums:
        # dweight/dbias come out of the entry and the caller drops the (N, C) sums: they
        # stay a numpy scratch (two torch.from_numpy less per call).
        sums = np.empty((2, n, c), _NUMPY_ACC[acc])
        sum_dz_xhat = sum_dz = None
        s1, s0 = sums[0], sums[1]
    else:
        sum_dz_xhat, s1 = alloc.empty_pair((n, c), acc)
        sum_dz, s0 = alloc.empty_pair((n, c), acc)
    channels_last = is_channels_last(x)
    dx = alloc.output_tensor_like(x, channels_last)[0] if need_dx else None
    # (C,) like the parameter: torch.empty_like(w) costs half of torch.empty((c,), dtype=...)
    dw = alloc.empty_like(weight) if param_sums and weight is not None else None
    db = alloc.empty_like(bias) if param_sums and bias is not None else None
    # Prepared inputs stay referenced (locals, keep) until the entry has run.
    keep = []
    m, r = stat_tensor(mean, acc), stat_tensor(rstd, acc)
    dy = like_layout(dy, x)
    entry, stream = _backward_entry(n, c, hw, num_groups, channels_last, threads, numel, x.itemsize, need_dx)
    with pool.LOCK:   # see threads: workqueue takes one caller at a time
        entry(dy.data_ptr(), x.data_ptr(), (x if dx is None else dx).data_ptr(), WITNESS[x.dtype], n, c, hw,
              bool(need_dx), stream, m.data_ptr(), r.data_ptr(), WITNESS[acc],
              num_groups, *_param_at(weight, acc, keep), *_param_at(bias, acc, keep), *_param_at(scale, acc, keep),
              *_param_at(shift, acc, keep), CODES[activation], _ZERO[acc], s1, s0, *_at(dw, acc), *_at(db, acc),
              threads)
    if dx is not None and numel == n * num_groups:
        one_element_groups(dx, dy, x, r, weight)
    return sum_dz_xhat, sum_dz, dx, dw, db


def one_element_groups(dx, dy, x, rstd, weight) -> None:
    """dx when every group holds one element: exactly 0, or NaN where torch's is (a
    non-finite dy, x, weight, or rstd = inf from eps = 0). Such a group normalises to a
    constant (x - mean = 0), so dx = rstd * (dxhat - dxhat) = 0; the kernels' dz1 * A + Q
    leaves a rounding residue there instead, which rstd = 1 / sqrt(eps) magnifies (~1e-4)."""
    shape = x.shape
    acc = rstd.dtype   # float32 or float64: a half-type rstd could overflow to inf
    zero = dy.to(acc) * 0 + x.to(acc) * 0
    zero = zero * rstd.reshape(shape[:2] + (1,) * (len(shape) - 2))
    if weight is not None:
        zero = zero + (weight.to(acc) * 0).reshape((1, -1) + (1,) * (len(shape) - 2))
    dx.copy_(zero)


def like_layout(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy in x's dtype and strides; a copy only when autograd hands over another layout."""
    if dy.requires_grad:   # only under create_graph; the kernels read raw memory anyway
        dy = dy.detach()
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    if dy.stride() == x.stride():
        return dy
    if is_channels_last(x):
        return dy.movedim(1, -1).contiguous().movedim(-1, 1)
    return dy.contiguous()
