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

The caller keeps every tensor alive for the duration of the call (they are its locals);
the arrays made here own nothing.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import carray, njit, types
from numba.extending import intrinsic

from .entries import backward_channels_last, backward_rows_fused, backward_rows_two_stage
from .forward_kernels import forward_groups, forward_pixel_blocks, forward_rows, forward_samples
from .numpy_views import KERNEL_NUMPY

# A zero of the type a kernel sees for each torch dtype (float32 / float64, half types as
# their bits): its Numba type says what an address points to.
WITNESS = {dtype: np.dtype(kind).type(0) for dtype, kind in KERNEL_NUMPY.items()}

# Which forward kernel forward_at runs (chosen by the launcher: see forward_kernels).
FORWARD_GROUPS, FORWARD_ROWS, FORWARD_SAMPLES, FORWARD_PIXEL_BLOCKS = 0, 1, 2, 3
# Which backward entry backward_at runs (see launch._backward).
BACKWARD_GROUPS, BACKWARD_ROWS, BACKWARD_CHANNELS_LAST = 0, 1, 2


@intrinsic
def _pointer_to(typingctx, address, like):
    """address (an int) as a pointer to like's type."""
    if not isinstance(address, types.Integer) or not isinstance(like, types.Number):
        return None
    pointer = types.CPointer(like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, like), codegen


@njit(cache=True)
def array_at(address, size, like):
    """The ``size`` elements of like's type at ``address`` as a 1-D array (no copy; the
    memory stays owned by the tensor the address came from)."""
    return carray(_pointer_to(address, like), size)


@njit(cache=True)
def forward_at(x_at, y_at, like, n_batch, channels, hw, layout, w_at, w_n, w_like, b_at, b_n, b_like,
               s_at, s_n, s_like, t_at, t_n, t_like, eps, act, zero, mean, rstd):
    """launch.forward's kernel call from addresses. x, y: N * C * HW elements in x's memory
    order; weight/bias: (C,) or 0 elements, scale/shift: (N*C,) or 0; mean, rstd: (N, G)
    outputs. layout: the kernel launch.forward picked (FORWARD_* below)."""
    groups = mean.shape[1]
    size = n_batch * channels * hw
    x = array_at(x_at, size, like)
    y = array_at(y_at, size, like)
    w = array_at(w_at, w_n, w_like)
    b = array_at(b_at, b_n, b_like)
    s = array_at(s_at, s_n, s_like)
    t = array_at(t_at, t_n, t_like)
    if layout == FORWARD_GROUPS:
        rows = n_batch * groups
        forward_groups(x.reshape(rows, size // rows), y.reshape(rows, size // rows), hw, w, b, s, t, eps, act,
                       zero, mean, rstd)
    elif layout == FORWARD_ROWS:
        forward_rows(x.reshape(n_batch * groups, size // (n_batch * groups)), x.reshape(n_batch * channels, hw),
                     y.reshape(n_batch * channels, hw), w, b, s, t, eps, act, zero, mean, rstd)
    elif layout == FORWARD_SAMPLES:
        forward_samples(x.reshape(n_batch, hw, channels), y.reshape(n_batch, hw, channels), w, b, s, t, eps,
                        act, mean, rstd)
    else:
        forward_pixel_blocks(x.reshape(n_batch, hw, channels), y.reshape(n_batch, hw, channels), w, b, s, t,
                             eps, act, zero, mean, rstd)


@njit(cache=True)
def backward_at(dy_at, x_at, dx_at, like, n_batch, channels, hw, layout, need_dx, mean_at, rstd_at, stat_like,
                groups, w_at, w_n, w_like, b_at, b_n, b_like, s_at, s_n, s_like, t_at, t_n, t_like, act, zero,
                sum_dz_xhat, sum_dz, dw_at, dw_n, dw_like, db_at, db_n, db_like):
    """launch._backward's entry call from addresses. dy, x, dx: N * C * HW elements in x's
    memory order (dx unwritten without need_dx); mean, rstd: N * G elements of stat_like's
    type; parameters as in forward_at; outputs sum_dz_xhat, sum_dz: (N, C) arrays, and
    dweight, dbias: (C,) or 0 elements."""
    size = n_batch * channels * hw
    dy = array_at(dy_at, size, like)
    x = array_at(x_at, size, like)
    dx = array_at(dx_at, size, like)
    mean = array_at(mean_at, n_batch * groups, stat_like).reshape(n_batch, groups)
    rstd = array_at(rstd_at, n_batch * groups, stat_like).reshape(n_batch, groups)
    w = array_at(w_at, w_n, w_like)
    b = array_at(b_at, b_n, b_like)
    s = array_at(s_at, s_n, s_like)
    t = array_at(t_at, t_n, t_like)
    dw = array_at(dw_at, dw_n, dw_like)
    db = array_at(db_at, db_n, db_like)
    rows = n_batch * channels
    if layout == BACKWARD_CHANNELS_LAST:
        backward_channels_last(dy.reshape(n_batch, hw, channels), x.reshape(n_batch, hw, channels),
                               dx.reshape(n_batch, hw, channels), mean, rstd, w, b, s, t, act, need_dx, zero,
                               sum_dz_xhat, sum_dz, dw, db)
    elif layout == BACKWARD_GROUPS:
        backward_rows_fused(dy.reshape(rows, hw), x.reshape(rows, hw), dx.reshape(rows, hw), channels // groups,
                            mean, rstd, w, b, s, t, act, need_dx, zero, sum_dz_xhat.reshape(rows),
                            sum_dz.reshape(rows), dw, db)
    else:
        backward_rows_two_stage(dy.reshape(rows, hw), x.reshape(rows, hw), dx.reshape(rows, hw), mean, rstd,
                                w, b, s, t, act, need_dx, zero, sum_dz_xhat, sum_dz, dw, db)


def tensor_at(t: torch.Tensor):
    """(address, element count, witness) of a contiguous tensor for the entries above."""
    return t.data_ptr(), t.numel(), WITNESS[t.dtype]
