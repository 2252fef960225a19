"""Numpy views of torch tensors' memory for the kernels: no copies, half types as bits.

float32/float64 go through ``.numpy()``; bfloat16 becomes a uint16 view and float16 an
int16 view of the same bytes (the kernels convert bits). Shared by ``launch`` (inputs)
and ``alloc`` (outputs), which sits below it.
"""
from __future__ import annotations

import numpy as np
import torch

# The numpy dtype a kernel sees for each torch dtype.
KERNEL_NUMPY = {torch.float32: np.float32, torch.float64: np.float64,
                torch.bfloat16: np.uint16, torch.float16: np.int16}
HALF = (torch.bfloat16, torch.float16)

# (N, C, *spatial) <-> (N, *spatial, C): channels-last memory order and back.
TO_PIXELS = {d: (0,) + tuple(range(2, d)) + (1,) for d in range(2, 9)}
FROM_PIXELS = {d: (0, d - 1) + tuple(range(1, d - 1)) for d in range(2, 9)}


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of t's memory; half types as their raw bits.

    Torch calls cost microseconds each on small shapes, so the common path is one
    ``.numpy()`` (``force``: detaches a tensor that requires grad, no copy); reshapes
    happen in numpy.
    """
    dtype = t.dtype
    if dtype in HALF:
        return t.view(torch.int16).numpy(force=True).view(KERNEL_NUMPY[dtype])
    return t.numpy(force=True)


def pixels_view(x: torch.Tensor) -> np.ndarray:
    """Channels-last x as (N, HW, C), no copy (a transpose of numpy strides, then a
    reshape that numpy can do as a view because the transposed array is C-contiguous)."""
    a = as_numpy(x).transpose(TO_PIXELS[x.dim()])
    return a.reshape(a.shape[0], -1, a.shape[-1])


def memory_order(t: torch.Tensor, channels_last: bool) -> np.ndarray:
    """t's memory as a flat array in memory order (t contiguous, or channels-last when
    channels_last), without a copy."""
    a = as_numpy(t)
    return (a.transpose(TO_PIXELS[t.dim()]) if channels_last else a).reshape(-1)
