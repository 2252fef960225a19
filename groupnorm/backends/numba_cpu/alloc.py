"""Every output tensor of the backend is allocated here.

One place so tests can swap in a poisoning allocator (NaN-filled tensors) and catch any
element a kernel forgets to write.

Full-size outputs (y, dx) of at least ``POOL_MIN_BYTES`` come from ``output_pool``: the
memory of a freed output of the same size, already mapped and usually still in cache,
instead of fresh pages from glibc (one page fault per 4 KiB; see output_pool for the
measured cost). Smaller outputs, and whatever the pool's bounds turn away, are allocated
as before.

Why new large buffers get their own mapping: glibc serves allocations above its largest
mmap threshold (32 MiB on 64-bit) with a fresh ``mmap`` every time, so each call to
torch's CPU allocator for such a tensor takes one page fault per 4 KiB page on first
write. On the (1, 128, 512, 512) float32 output of an SD VAE decoder that is 32768 faults,
about 50 ms: most of what ATen's group_norm spends. The same bytes mapped with
``MADV_HUGEPAGE`` fault once per 2 MiB (measured 59 -> 12 ms to allocate and fill 134 MB).
Set ``GROUPNORM_HUGE_PAGES=0`` to turn that off, ``GROUPNORM_OUTPUT_POOL_MB=0`` the pool.
"""
from __future__ import annotations

import mmap
import os

import numpy as np
import torch

from .numpy_views import FROM_PIXELS, HALF, KERNEL_NUMPY, memory_order
from .output_pool import OutputPool, aligned_bytes

# At and above this size glibc always maps fresh pages; below it freed blocks are reused.
HUGE_PAGE_MIN_BYTES = 32 << 20
_HUGE_PAGE = 2 << 20
_HUGE_PAGES_USABLE = (os.environ.get("GROUPNORM_HUGE_PAGES", "1") != "0"
                      and hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS"))
# Outputs from this size on are pooled (smaller ones: the pool costs ~1-4 us more than
# torch.empty_like per output, which small shapes notice and rarely win back).
POOL_MIN_BYTES = 1 << 20
POOL_LIMIT_MB = int(os.environ.get("GROUPNORM_OUTPUT_POOL_MB", "512"))


def _new_pool_buffer(nbytes: int) -> np.ndarray:
    if nbytes >= HUGE_PAGE_MIN_BYTES and _HUGE_PAGES_USABLE:
        return huge_page_bytes(nbytes)
    return aligned_bytes(nbytes)


POOL = OutputPool(POOL_LIMIT_MB << 20, new_buffer=_new_pool_buffer)


def output_like(x: torch.Tensor, channels_last: bool):
    """(tensor, flat numpy view of its memory in memory order, half types as bits) with
    x's shape, dtype and memory format (contiguous, or channels-last when channels_last).
    The flat view spares the launcher a ``.numpy()`` and a transpose per output."""
    y, flat = output_tensor_like(x, channels_last)
    return y, (memory_order(y, channels_last) if flat is None else flat)


def output_tensor_like(x: torch.Tensor, channels_last: bool):
    """output_like for a caller that passes the output by address: (tensor, its flat
    numpy view, or None where making one would cost a ``.numpy()``)."""
    nbytes = x.numel() * x.element_size()
    if nbytes < POOL_MIN_BYTES:
        return empty_like(x), None
    return _pooled(x, x.shape, x.dtype, nbytes, channels_last)


def output_known(x: torch.Tensor, shape, dtype: torch.dtype, nbytes: int, channels_last: bool) -> torch.Tensor:
    """output_tensor_like's tensor, for a caller that has read x's shape, dtype and size
    in bytes already (``launch._forward_known``, ``launch.backward_known``)."""
    if nbytes < POOL_MIN_BYTES:
        return torch.empty_like(x)
    return _pooled(x, shape, dtype, nbytes, channels_last)[0]


def _pooled(x: torch.Tensor, shape, dtype: torch.dtype, nbytes: int, channels_last: bool):
    """(tensor like x on a pooled buffer, the buffer as the kernels' flat view), or
    (empty_like(x), None) when the pool's bounds say no.

    Every line here runs right after the previous kernel has flushed the caches, where
    each Python or torch call costs microseconds (measured 2026-11-27): the
    buffer comes already viewed as the kernels' element type, x's shape and dtype come
    from the caller, and strides are compared only where they can differ. shape: x.shape."""
    got = POOL.take(nbytes, KERNEL_NUMPY[dtype])
    if got is None:
        return empty_like(x), None
    flat, home = got
    if channels_last:
        wrapped = flat.reshape((shape[0],) + shape[2:] + (shape[1],)).transpose(FROM_PIXELS[len(shape)])
    else:
        wrapped = flat.reshape(shape)
    POOL.lend(wrapped, flat, home)
    y = torch.from_numpy(wrapped)
    if dtype in HALF:
        y = y.view(dtype)
    if 1 in shape and y.stride() != x.stride():
        # Only the strides of size-1 dims can differ (same memory order, dense): keep
        # x's, as torch.empty_like would.
        y = y.as_strided(shape, x.stride())
    return y, flat


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """Same shape, dtype and memory format as x (x is contiguous or channels-last),
    outside the pool."""
    nbytes = x.numel() * x.element_size()
    if nbytes >= HUGE_PAGE_MIN_BYTES and _HUGE_PAGES_USABLE:
        return huge_page_tensor(nbytes, x.dtype).as_strided(x.shape, x.stride())
    return torch.empty_like(x)


def release_cached_memory() -> int:
    """Return the pool's free output buffers to the system -> bytes released.

    Buffers under glibc's mmap threshold (which rises to the size of the largest block
    freed, up to 32 MiB) live on the heap, where free() keeps them for reuse: malloc_trim
    hands those pages back too, so the process's resident size drops."""
    released = POOL.release()
    if released:
        _trim_heap()
    return released


def _trim_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to trim
        pass


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous statistics / reduction tensor."""
    return torch.empty(shape, dtype=dtype)


def empty_pair(shape, dtype: torch.dtype):
    """(tensor, its numpy view) for a float32/float64 statistics output: allocating in
    numpy and wrapping costs ~1.3 us against ~3 us for torch.empty plus .numpy()."""
    array = np.empty(shape, _NUMPY_DTYPES[dtype])
    return torch.from_numpy(array), array


def huge_page_bytes(nbytes: int) -> np.ndarray:
    """nbytes of uninitialised uint8 on their own 2 MiB-aligned anonymous mapping advised
    for transparent huge pages (a plain mapping where the kernel declines). The array
    keeps the mapping alive."""
    mapping = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass  # THP disabled ("never"): still a correct, ordinary mapping
    raw = np.frombuffer(mapping, np.uint8)
    start = (-raw.ctypes.data) % _HUGE_PAGE
    return raw[start:start + nbytes]


def huge_page_tensor(nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat uninitialised tensor of nbytes on a huge-page mapping (huge_page_bytes);
    the tensor keeps the mapping alive."""
    return torch.from_numpy(huge_page_bytes(nbytes)).view(dtype)
