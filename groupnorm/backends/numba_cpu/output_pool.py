"""Reuse the memory of freed outputs (y, dx) instead of asking glibc for it again.

Why: glibc returns freed memory at the top of its heap to the kernel once more than its
trim threshold is free (``brk`` shrinks), and hands large blocks out as fresh ``mmap``
regions; either way the next output of the same size takes one page fault per 4 KiB on
first write. On this project's 2-core VM a run of (2, 640, 32, 32) float32 forward +
backward calls went between ~1.1 ms and ~7 ms per call depending only on whether the
heap was in that state (0 or 700 page faults per call), for ATen's outputs as much as
ours. A buffer handed back here is already mapped and usually still in cache.

How: each buffer is a 64-byte aligned numpy array, kept flat and already viewed as the
element type it was last handed out as (free lists by byte size and numpy type: a dtype
view costs ~7 us right after a kernel has flushed the caches, measured 2026-11-27 with
``benchmarks/glue_cost.py``, removed after eb1f750). The tensor handed out wraps a fresh numpy view of it
(``torch.from_numpy``: the tensor's storage keeps that view alive, whatever views or
slices of the tensor the caller makes). A weak reference to the view returns the buffer
to its free list when the storage dies; the next request of that size and type pops it
(last freed first: warmest in cache), and a request of that size for another type takes
a free buffer of the other type before growing the pool. Nothing is ever shared between
live tensors, and a buffer's old contents are never observable through the API: every
kernel writes its whole output (the tests poison outputs to check that).

Bounds: at most ``limit_bytes`` pooled (in use + free; the rest is allocated as before),
at most ``per_size`` buffers of one size; free buffers of other sizes are dropped to make
room. ``GROUPNORM_OUTPUT_POOL_MB`` sets the limit (0 turns pooling off);
``groupnorm.release_cached_memory()`` drops every free buffer.
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

ALIGN = 64


def aligned_bytes(nbytes: int) -> np.ndarray:
    """A 64-byte aligned uint8 array of nbytes (torch's CPU allocator aligns to 64 too)."""
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + nbytes]


class OutputPool:
    """Free lists of output buffers by size and element type; see the module docstring."""

    def __init__(self, limit_bytes: int, per_size: int = 8,
                 new_buffer: Callable[[int], np.ndarray] = aligned_bytes):
        self.limit_bytes = int(limit_bytes)
        self.per_size = per_size
        self._new_buffer = new_buffer
        # (nbytes, numpy type) -> free flat buffers of that type (LIFO). A list, once made,
        # stays the list of its key: a buffer in use remembers where it goes back.
        self._free: Dict[Tuple[int, type], List[np.ndarray]] = {}
        self._count: Dict[int, int] = {}               # nbytes -> buffers pooled (free + in use)
        self._pooled_bytes = 0
        self._handed_out: Dict[int, tuple] = {}   # id(weakref) -> (weakref, buffer, its free list)
        # Guards the counts; the free lists and _handed_out change without it (single list /
        # dict operations), so a buffer coming back (a weakref callback) never waits.
        self._lock = threading.Lock()

    @property
    def pooled_bytes(self) -> int:
        return self._pooled_bytes

    def free_buffers(self) -> int:
        return sum(len(v) for v in self._free.values())

    def take(self, nbytes: int, kind: type = np.uint8) -> Optional[Tuple[np.ndarray, list]]:
        """(a free or new flat buffer of nbytes as numpy type ``kind``, the free list it
        goes back to), or None when the bounds say no. The buffer is out of the free lists
        until ``lend`` ties it to the array a tensor will wrap."""
        home = self._free.get((nbytes, kind))
        if home:
            try:
                return home.pop(), home
            except IndexError:   # another thread took the last one
                pass
        elif home is None:
            home = self._free.setdefault((nbytes, kind), [])
        buf = self._free_of_other_kind(nbytes, kind)
        if buf is None:
            buf = self._grow(nbytes)
        return None if buf is None else (buf.view(kind), home)

    def lend(self, wrapped: np.ndarray, buf: np.ndarray, home: list) -> None:
        """buf (from ``take``, with its free list ``home``) returns to home when ``wrapped``
        (a view of buf that the tensor's storage holds: the very object given to
        ``torch.from_numpy``) is deallocated. (numpy collapses view chains to the memory's
        owner, so a view *of* wrapped would not keep wrapped alive: wrap this object itself.)"""
        ref = weakref.ref(wrapped, self._returned)   # an ndarray is unhashable: keyed by id
        self._handed_out[id(ref)] = (ref, buf, home)

    def _returned(self, ref: weakref.ref) -> None:
        entry = self._handed_out.pop(id(ref), None)
        if entry is not None:
            entry[2].append(entry[1])

    def _free_of_other_kind(self, nbytes: int, kind: type) -> Optional[np.ndarray]:
        """A free buffer of nbytes kept as another numpy type (rare: two dtypes whose
        outputs have the same byte size), or None."""
        for (size, other), free in list(self._free.items()):
            if size == nbytes and other is not kind and free:
                try:
                    return free.pop()
                except IndexError:
                    pass
        return None

    def _grow(self, nbytes: int) -> Optional[np.ndarray]:
        with self._lock:
            if self._count.get(nbytes, 0) >= self.per_size or nbytes > self.limit_bytes:
                return None
            if self._pooled_bytes + nbytes > self.limit_bytes:
                self._evict(self._pooled_bytes + nbytes - self.limit_bytes, keep=nbytes)
                if self._pooled_bytes + nbytes > self.limit_bytes:
                    return None
            buf = self._new_buffer(nbytes)
            self._count[nbytes] = self._count.get(nbytes, 0) + 1
            self._pooled_bytes += nbytes
            return buf

    def _evict(self, want: int, keep: int = -1) -> int:
        """Drop free buffers (other sizes than keep first) until want bytes are gone.
        The caller holds the lock."""
        dropped = 0
        for key in sorted(self._free, key=lambda k: k[0] == keep):
            size, free = key[0], self._free[key]
            while free and dropped < want:
                try:
                    free.pop()
                except IndexError:
                    break
                self._count[size] -= 1
                self._pooled_bytes -= size
                dropped += size
        return dropped

    def release(self) -> int:
        """Drop every free buffer -> bytes released. (Buffers in use stay pooled: they
        come back to the free lists when their tensors die.)"""
        with self._lock:
            return self._evict(1 << 62)
