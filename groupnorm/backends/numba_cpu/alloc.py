"""Every output tensor of the backend is allocated here.

One place so tests can swap in a poisoning allocator (NaN-filled tensors) and catch any
element a kernel forgets to write.

Why large outputs get their own mapping: glibc serves allocations above its largest mmap
threshold (32 MiB on 64-bit) with a fresh ``mmap`` every time, so each call to torch's CPU
allocator for such a tensor takes one page fault per 4 KiB page on first write. On the
(1, 128, 512, 512) float32 output of an SD VAE decoder that is 32768 faults, about 50 ms:
most of what ATen's group_norm spends. The same bytes mapped with ``MADV_HUGEPAGE`` fault
once per 2 MiB (measured 59 -> 12 ms to allocate and fill 134 MB). Nothing is cached: the
mapping is released when the tensor dies, exactly like torch's own large allocations.
Set ``GROUPNORM_HUGE_PAGES=0`` to turn it off.
"""
from __future__ import annotations

import mmap
import os

import numpy as np
import torch

# At and above this size glibc always maps fresh pages; below it freed blocks are reused.
HUGE_PAGE_MIN_BYTES = 32 << 20
_HUGE_PAGE = 2 << 20
_HUGE_PAGES_USABLE = (os.environ.get("GROUPNORM_HUGE_PAGES", "1") != "0"
                      and hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS"))


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """Same shape, dtype and memory format as x (x is contiguous or channels-last)."""
    nbytes = x.numel() * x.element_size()
    if nbytes >= HUGE_PAGE_MIN_BYTES and _HUGE_PAGES_USABLE:
        return huge_page_tensor(nbytes, x.dtype).as_strided(x.shape, x.stride())
    return torch.empty_like(x)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous statistics / reduction tensor."""
    return torch.empty(shape, dtype=dtype)


def empty_pair(shape, dtype: torch.dtype):
    """(tensor, its numpy view) for a float32/float64 statistics output: allocating in
    numpy and wrapping costs ~1.3 us against ~3 us for torch.empty plus .numpy()."""
    array = np.empty(shape, _NUMPY_DTYPES[dtype])
    return torch.from_numpy(array), array


def huge_page_tensor(nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat uninitialised tensor of nbytes on its own 2 MiB-aligned anonymous mapping
    advised for transparent huge pages (a plain mapping where the kernel declines)."""
    mapping = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass  # THP disabled ("never"): still a correct, ordinary mapping
    raw = np.frombuffer(mapping, np.uint8)
    start = (-raw.ctypes.data) % _HUGE_PAGE
    # The numpy view keeps the mapping alive; the tensor keeps the view alive.
    return torch.from_numpy(raw[start:start + nbytes]).view(dtype)
