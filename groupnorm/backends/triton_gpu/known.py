"""The everyday eager call's entries (``groupnorm.everyday``): x's facts handed in, not asked.

``everyday.output`` reads shape, dtype, element count and layout once and passes them on;
these entries build the launch layout from them and allocate only what is returned or
saved: y; mean and rstd only when a gradient will be taken (and not even written on the
"group" forward path of a call without one); dx, dweight, dbias only when wanted. The
same kernels and bits as ``launch.forward`` / ``launch.backward_grads``.
"""
from __future__ import annotations

import torch

from . import launch

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def forward_known(x, shape, dtype, numel, channels_last, weight, bias, num_groups, eps, activation):
    """y of an inference call (no statistics tensors)."""
    lay = launch.Layout.known(shape, numel, channels_last, num_groups, x.get_device())
    return launch._forward(x, lay, weight, bias, None, None, eps, activation, None, None)


def forward_known_stats(x, shape, dtype, numel, channels_last, weight, bias, num_groups, eps, activation):
    """forward_known for a call that will be differentiated -> (y, (mean, rstd), None)."""
    lay = launch.Layout.known(shape, numel, channels_last, num_groups, x.get_device())
    acc = launch.acc_dtype(dtype)
    mean = launch.empty((lay.n, num_groups), acc, x.device)
    rstd = launch.empty((lay.n, num_groups), acc, x.device)
    y = launch._forward(x, lay, weight, bias, None, None, eps, activation, mean, rstd)
    return y, (mean, rstd), None


def backward_known(dy, x, stats, stats_at, weight, bias, shape, dtype, numel, channels_last, num_groups,
                   activation, need_dx, need_weight, need_bias):
    """The backward of a forward_known_stats call -> (dx, dweight, dbias), None where not
    needed. dy: y's gradient, any strides (brought to x's layout when they differ)."""
    mean, rstd = stats
    if channels_last:
        fmt = _CHANNELS_LAST.get(len(shape))
        same = dy.is_contiguous(memory_format=fmt) if fmt is not None else dy.stride() == x.stride()
    else:
        same = dy.is_contiguous()
    if not same:
        out = torch.empty_like(x, dtype=dy.dtype)
        out.copy_(dy)
        dy = out
    lay = launch.Layout.known(shape, numel, channels_last, num_groups, x.get_device())
    grads = launch._backward(dy, x, lay, mean, rstd, weight, bias, None, None, activation, bool(need_dx),
                             bool(need_weight) and weight is not None, bool(need_bias) and bias is not None,
                             False, False)
    return grads[0], grads[1], grads[2]
