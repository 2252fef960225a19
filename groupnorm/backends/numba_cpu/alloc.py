"""Every output tensor of the backend is allocated here.

One place so tests can swap in a poisoning allocator (NaN-filled tensors) and catch any
element a kernel forgets to write.
"""
from __future__ import annotations

import torch


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """Same shape, dtype and memory format as x (torch.empty_like preserves strides)."""
    return torch.empty_like(x)


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous statistics / reduction tensor."""
    return torch.empty(shape, dtype=dtype)
