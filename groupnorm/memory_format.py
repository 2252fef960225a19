"""The memory format of torch's GroupNorm output for a given input.

torch's CPU group_norm copies an input that is neither contiguous nor channels-last into
``input.suggest_memory_format()`` and returns its output in that format, so a tile cut from
a channels-last tensor (``x[..., :20, :]``) or a strided NHWC view comes back channels-last.
We copy such inputs into the same format, which also lets the channels-last kernels run.
"""
from __future__ import annotations

import torch

# Dimension order from fastest to slowest stride in a channels-last (N, C, *spatial) tensor.
_CHANNELS_LAST_ORDER = {4: ((1, 3, 2, 0), torch.channels_last), 5: ((1, 4, 3, 2, 0), torch.channels_last_3d)}


def suggested(x: torch.Tensor) -> torch.memory_format:
    """c10's ``TensorImpl::suggest_memory_format`` for a strided tensor: channels_last (4-D)
    or channels_last_3d (5-D) when x's strides rank like that format's, else contiguous.

    The rule, as c10 has it: walking C, then the spatial dims from last to first, then N,
    each stride must be at least the previous one times its size (size-1 dims not
    multiplied); C's stride must not be 0, no size may be 0, and an N whose stride equals
    the smallest seen so far (an N111-like tensor) falls back to contiguous."""
    rule = _CHANNELS_LAST_ORDER.get(x.dim())
    if rule is None or x.layout != torch.strided:
        return torch.contiguous_format
    order, fmt = rule
    sizes, strides = x.shape, x.stride()
    if strides[1] == 0:
        return torch.contiguous_format
    smallest = 0
    for d in order:
        if sizes[d] == 0 or strides[d] < smallest or (d == 0 and smallest == strides[1]):
            return torch.contiguous_format
        smallest = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return fmt
