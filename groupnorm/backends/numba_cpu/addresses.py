"""Compiled entries that take tensors as raw addresses instead of numpy views.

Viewing a tensor for Numba costs ~2 us (``Tensor.numpy()``) plus ~0.3 us to unbox the
array at the call; ``Tensor.data_ptr()`` costs ~0.3 us and an int unboxes in tens of
nanoseconds. On small shapes (an SD UNet's 2x1280x8x8, where a forward's kernel takes
tens of microseconds) the views were a large part of the glue. The launcher passes each
tensor as (address, element count) plus a *witness*: a zero of the element type the
kernel should see (``WITNESS``), whose type picks the compiled specialisation exactly
as an array's dtype did. The arrays rebuilt here are the same views ``numpy_views``
made (C-ordered memory order, half types as their bits) and are handed to the same
kernels.

One entry per kernel path (the launcher picks it, as it picked the kernel before): an
entry that branched on the layout at run time compiled every path for every signature,
which made the first call (and the test run) minutes longer.

The caller keeps every tensor alive for the duration of the call (they are its locals);
the arrays made here own nothing.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import carray, njit, types
from numba.extending import intrinsic

from .entries import backward_channels_last, backward_rows_fused, backward_rows_two_stage, backward_samples
from .forward_kernels import forward_groups, forward_pixel_blocks, forward_rows, forward_samples
from .numpy_views import KERNEL_NUMPY

# A zero of the type a kernel sees for each torch dtype (float32 / float64, half types as
# their bits): its Numba type says what an address points to.
WITNESS = {dtype: np.dtype(kind).type(0) for dtype, kind in KERNEL_NUMPY.items()}



@intrinsic
def _pointer_to(typingctx, address, like):
    """address (an int) as a pointer to like's type."""
    if not isinstance(address, types.Integer) or not isinstance(like, types.Number):
        return None
    pointer = types.CPointer(like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, like), codegen


@njit(cache=True, error_model="numpy", fastmath=False)
def array_at(address, size, like):
    """The ``size`` elements of like's type at ``address`` as a 1-D array (no copy; the
    memory stays owned by the tensor the address came from)."""
    return carray(_pointer_to(address, like), size)


@njit(cache=True, error_model="numpy", fastmath=False)
def params_at(w_at, w_n, w_like, b_at, b_n, b_like, s_at, s_n, s_like, t_at, t_n, t_like):
    """(weight, bias, scale, shift) arrays from their (address, count, witness) triples:
    weight/bias (C,) or 0 elements, scale/shift (N*C,) or 0."""
    return (array_at(w_at, w_n, w_like), array_at(b_at, b_n, b_like), array_at(s_at, s_n, s_like),
            array_at(t_at, t_n, t_like))


# Forward entries: x, y are N * C * HW elements in x's memory order; mean, rstd (N, G)
# outputs; stream: None, or True to write y with streaming stores (forward_samples' small
# samples never are; the launcher passes None there); threads: the thread count the
# launcher set (forward_groups and forward_pixel_blocks run their tasks in that many
# runs: pixel_tasks.thread_run; the others ignore it); the same arguments for each, so the
# launcher calls whichever it picked. Each returns mean's address: a caller that keeps the
# statistics for a backward entry gets it here (numpy's ``ctypes.data`` costs ~18 us
# right after a kernel, against nanoseconds to box an int).

@njit(cache=True, error_model="numpy", fastmath=False)
def forward_groups_at(x_at, y_at, like, n_batch, channels, hw, w_at, w_n, w_like, b_at, b_n, b_like,
                      s_at, s_n, s_like, t_at, t_n, t_like, eps, act, zero, mean, rstd, stream, threads):
    """forward_kernels.forward_groups: contiguous, per-(n, g) tasks in runs."""
    rows = n_batch * mean.shape[1]
    size = n_batch * channels * hw
    w, b, s, t = params_at(w_at, w_n, w_like, b_at, b_n, b_like, s_at, s_n, s_like, t_at, t_n, t_like)
    forward_groups(array_at(x_at, size, like).reshape(rows, size // rows),
                   array_at(y_at, size, like).reshape(rows, size // rows), hw, w, b, s, t, eps, act, zero, mean,
                   rstd, stream, threads)
    return mean.ctypes.data


@njit(cache=True, error_model="numpy", fastmath=False)
def forward_rows_at(x_at, y_at, like, n_batch, channels, hw, w_at, w_n, w_like, b_at, b_n, b_like,
                    s_at, s_n, s_like, t_at, t_n, t_like, eps, act, zero, mean, rstd, stream, threads):
    """forward_kernels.forward_rows: contiguous, few groups."""
    groups = mean.shape[1]
    size = n_batch * channels * hw
    x = array_at(x_at, size, like)
    w, b, s, t = params_at(w_at, w_n, w_like, b_at, b_n, b_like, s_at, s_n, s_like, t_at, t_n, t_like)
    forward_rows(x.reshape(n_batch * groups, size // (n_batch * groups)), x.reshape(n_batch * channels, hw),
                 array_at(y_at, size, like).reshape(n_batch * channels, hw), w, b, s, t, eps, act, zero, mean,
                 rstd, stream)
    return mean.ctypes.data


@njit(cache=True, error_model="numpy", fastmath=False)
def forward_samples_at(x_at, y_at, like, n_batch, channels, hw, w_at, w_n, w_like, b_at, b_n, b_like,
                       s_at, s_n, s_like, t_at, t_n, t_like, eps, act, zero, mean, rstd, stream, threads):
    """forward_kernels.forward_samples: channels-last, one task per sample."""
    size = n_batch * channels * hw
    w, b, s, t = params_at(w_at, w_n, w_like, b_at, b_n, b_like, s_at, s_n, s_like, t_at, t_n, t_like)
    forward_samples(array_at(x_at, size, like).reshape(n_batch, hw, channels),
                    array_at(y_at, size, like).reshape(n_batch, hw, channels), w, b, s, t, eps, act, mean, rstd)
    return mean.ctypes.data


@njit(cache=True, error_model="numpy", fastmath=False)
def forward_pixel_blocks_at(x_at, y_at, like, n_batch, channels, hw, w_at, w_n, w_like, b_at, b_n, b_like,
                            s_at, s_n, s_like, t_at, t_n, t_like, eps, act, zero, mean, rstd, stream, threads):
    """forward_kernels.forward_pixel_blocks: channels-last, statistics then apply."""
    size = n_batch * channels * hw
    w, b, s, t = params_at(w_at, w_n, w_like, b_at, b_n, b_like, s_at, s_n, s_like, t_at, t_n, t_like)
    forward_pixel_blocks(array_at(x_at, size, like).reshape(n_batch, hw, channels),
                         array_at(y_at, size, like).reshape(n_batch, hw, channels), w, b, s, t, eps, act, zero,
                         mean, rstd, stream, threads)
    return mean.ctypes.data


# Backward entries: dy, x, dx are N * C * HW elements in x's memory order (dx unwritten
# without need_dx, written with streaming stores when stream is True, not None); mean, rstd: N * G
# elements of stat_like's type; outputs sum_dz_xhat, sum_dz: (N, C) arrays, and
# dweight, dbias: (C,) or 0 elements; threads as for the forward entries (used by the
# contiguous per-group and the channels-last pixel-block backward).

@njit(cache=True, error_model="numpy", fastmath=False)
def backward_arrays_at(dy_at, x_at, dx_at, like, shape, mean_at, rstd_at, stat_like, n_batch, groups):
    """(dy, x, dx, mean, rstd) of a backward entry: the three data arrays in ``shape``
    (rows or pixels), the statistics as (N, G)."""
    size = 1
    for d in shape:
        size *= d
    stats = n_batch * groups
    return (array_at(dy_at, size, like).reshape(shape), array_at(x_at, size, like).reshape(shape),
            array_at(dx_at, size, like).reshape(shape),
            array_at(mean_at, stats, stat_like).reshape(n_batch, groups),
            array_at(rstd_at, stats, stat_like).reshape(n_batch, groups))


@njit(cache=True, error_model="numpy", fastmath=False)
def backward_groups_at(dy_at, x_at, dx_at, like, n_batch, channels, hw, need_dx, stream, mean_at, rstd_at,
                       stat_like, groups, w_at, w_n, w_like, b_at, b_n, b_like, s_at, s_n, s_like, t_at, t_n,
                       t_like, act, zero, sum_dz_xhat, sum_dz, dw_at, dw_n, dw_like, db_at, db_n, db_like, threads):
    """entries.backward_rows_fused: contiguous, per-(n, g) tasks in runs."""
    rows = n_batch * channels
    dy, x, dx, mean, rstd = backward_arrays_at(dy_at, x_at, dx_at, like, (rows, hw), mean_at, rstd_at,
                                               stat_like, n_batch, groups)
    w, b, s, t = params_at(w_at, w_n, w_like, b_at, b_n, b_like, s_at, s_n, s_like, t_at, t_n, t_like)
    backward_rows_fused(dy, x, dx, channels // groups, mean, rstd, w, b, s, t, act, need_dx, stream, zero,
                        sum_dz_xhat.reshape(rows), sum_dz.reshape(rows), array_at(dw_at, dw_n, dw_like),
                        array_at(db_at, db_n, db_like), threads)


@njit(cache=True, error_model="numpy", fastmath=False)
def backward_rows_at(dy_at, x_at, dx_at, like, n_batch, channels, hw, need_dx, stream, mean_at, rstd_at,
                     stat_like, groups, w_at, w_n, w_like, b_at, b_n, b_like, s_at, s_n, s_like, t_at, t_n, t_like,
                     act, zero, sum_dz_xhat, sum_dz, dw_at, dw_n, dw_like, db_at, db_n, db_like, threads):
    """entries.backward_rows_two_stage: contiguous, few groups."""
    dy, x, dx, mean, rstd = backward_arrays_at(dy_at, x_at, dx_at, like, (n_batch * channels, hw), mean_at,
                                               rstd_at, stat_like, n_batch, groups)
    w, b, s, t = params_at(w_at, w_n, w_like, b_at, b_n, b_like, s_at, s_n, s_like, t_at, t_n, t_like)
    backward_rows_two_stage(dy, x, dx, mean, rstd, w, b, s, t, act, need_dx, stream, zero, sum_dz_xhat, sum_dz,
                            array_at(dw_at, dw_n, dw_like), array_at(db_at, db_n, db_like))


@njit(cache=True, error_model="numpy", fastmath=False)
def backward_channels_last_at(dy_at, x_at, dx_at, like, n_batch, channels, hw, need_dx, stream, mean_at, rstd_at,
                              stat_like, groups, w_at, w_n, w_like, b_at, b_n, b_like, s_at, s_n, s_like, t_at,
                              t_n, t_like, act, zero, sum_dz_xhat, sum_dz, dw_at, dw_n, dw_like, db_at, db_n,
                              db_like, threads):
    """entries.backward_channels_last: (N, HW, C)."""
    dy, x, dx, mean, rstd = backward_arrays_at(dy_at, x_at, dx_at, like, (n_batch, hw, channels), mean_at,
                                               rstd_at, stat_like, n_batch, groups)
    w, b, s, t = params_at(w_at, w_n, w_like, b_at, b_n, b_like, s_at, s_n, s_like, t_at, t_n, t_like)
    backward_channels_last(dy, x, dx, mean, rstd, w, b, s, t, act, need_dx, stream, zero, sum_dz_xhat, sum_dz,
                           array_at(dw_at, dw_n, dw_like), array_at(db_at, db_n, db_like), threads)


@njit(cache=True, error_model="numpy", fastmath=False)
def backward_samples_at(dy_at, x_at, dx_at, like, n_batch, channels, hw, need_dx, stream, mean_at, rstd_at,
                        stat_like, groups, w_at, w_n, w_like, b_at, b_n, b_like, s_at, s_n, s_like, t_at, t_n,
                        t_like, act, zero, sum_dz_xhat, sum_dz, dw_at, dw_n, dw_like, db_at, db_n, db_like, threads):
    """entries.backward_samples: (N, HW, C), one task per sample (stream: always None)."""
    dy, x, dx, mean, rstd = backward_arrays_at(dy_at, x_at, dx_at, like, (n_batch, hw, channels), mean_at,
                                               rstd_at, stat_like, n_batch, groups)
    w, b, s, t = params_at(w_at, w_n, w_like, b_at, b_n, b_like, s_at, s_n, s_like, t_at, t_n, t_like)
    backward_samples(dy, x, dx, mean, rstd, w, b, s, t, act, need_dx, zero, sum_dz_xhat, sum_dz,
                     array_at(dw_at, dw_n, dw_like), array_at(db_at, db_n, db_like))


def tensor_at(t: torch.Tensor):
    """(address, element count, witness) of a contiguous tensor for the entries above."""
    return t.data_ptr(), t.numel(), WITNESS[t.dtype]
