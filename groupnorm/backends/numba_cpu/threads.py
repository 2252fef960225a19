"""Numba's threading layer, chosen to survive fork and threads, and its worker count,
which follows torch's so the two never oversubscribe the cores.

Layer (docs/reliability.md): Numba's default on Linux is its GNU OpenMP layer, whose
fork handler kills every child forked after a parallel region ("Terminating: fork()
called from a process already using GNU OpenMP"): DataLoader workers, pre-fork servers.
Unless the user chose a layer (``NUMBA_THREADING_LAYER`` or ``numba.config``) or Numba's
pool already runs, start_pool asks for Numba's ``forksafe`` layer: TBB where installed,
else ``workqueue`` (TBB is a dependency on Linux x86-64, see ``_preload_tbb``). TBB is also thread-safe; workqueue is not (two Python threads inside
parallel regions at once abort the process), so with workqueue every kernel call holds
LOCK, one process-wide lock, and concurrent callers take turns. The price: a workqueue
parallel region costs ~20 us more than an OpenMP one (measured on 2 cores, even with
one thread), so small shapes pay it per call. ``NUMBA_THREADING_LAYER=omp`` gets the
old speed back for programs that never fork.

Results never depend on the layer or the thread count: every kernel partitions its work
by shape only.
"""
from __future__ import annotations

import contextlib
import os
import threading

import numba
import torch

# Below this much work a fork/join costs more than the work: run on the calling thread.
# Work counts elements plus ROW_WEIGHT per (n, c) row: a row costs its coefficients and a
# loop of its own (~6 ns) against ~0.3 ns per element, so many short rows are worth two
# threads long before many elements are. Measured (2 threads against 1, float32 forward
# through the API): 8x1024 (8192 elements, 8192 rows) 28 against 46 us, 32x64x4 28
# against 41, 2x1024 14 against 20; 1x8x32x32 (8 rows) 13 against 11, 1x32x7x7 equal.
SERIAL_BELOW = 1 << 15
ROW_WEIGHT = 16

# Numba's thread count is per calling thread; remember what we last set on each, since
# numba.get_num_threads costs more (~1.2 us) than the check below (~0.3 us). (Code that
# calls numba.set_num_threads itself changes only speed here, never results.)
_last = threading.local()
_pool_started = False
_starting = threading.Lock()


# Held around every call of a compiled parallel kernel when the layer is not thread-safe
# (workqueue); a no-op context otherwise (start_pool decides). Replaced in a forked child:
# a fork taken while another thread held it would leave the child's copy held forever.
LOCK = contextlib.nullcontext()
UNSAFE_FOR_THREADS = ("workqueue",)


def choose_layer() -> None:
    """Ask Numba for a fork-safe layer unless the user chose one or the pool runs already."""
    try:
        from numba.np.ufunc import parallel
        started = parallel._is_initialized
    except (ImportError, AttributeError):   # internals moved: leave Numba's own choice
        return
    if not started and numba.config.THREADING_LAYER == "default":
        _preload_tbb()
        numba.config.THREADING_LAYER = "forksafe"


def _preload_tbb() -> None:
    """Load pip's TBB (a dependency on Linux x86-64) by its path, so Numba's TBB layer finds it.

    The wheel puts libtbb.so.12 in <prefix>/lib, which a virtualenv's loader does not
    search; once loaded, Numba's tbbpool links against it by soname. TBB is fork-safe and
    thread-safe, and its parallel regions cost far less than workqueue's (measured with the
    main job on 2 cores, 2026-12-07: forward 1.07x / training step 1.38x torch eager on TBB,
    0.81x / 0.90x on workqueue, 1.22x / 1.32x on the fork-unsafe OpenMP layer)."""
    import ctypes
    import glob
    import sys

    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        for path in sorted(glob.glob(os.path.join(prefix, "lib", "libtbb.so.12*"))):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue


def start_pool() -> None:
    """Start Numba's worker pool on a fork-safe layer (choose_layer), set LOCK for it,
    and leave torch's thread count as it was.

    Numba's OpenMP layer resets the process's OpenMP thread count when it starts its
    pool, which silently undid a user's ``torch.set_num_threads(1)``; we start it once,
    here, and put torch's setting back.
    """
    with _starting:   # two threads' first calls: one chooses, both see its LOCK
        if _pool_started:
            return
        _start_pool()


def _start_pool() -> None:
    global _pool_started, LOCK
    torch_threads = torch.get_num_threads()
    choose_layer()
    numba.get_num_threads()   # starts the pool
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    if numba.threading_layer() in UNSAFE_FOR_THREADS:
        LOCK = threading.Lock()
    _pool_started = True


def _fresh_lock_in_child() -> None:
    global LOCK
    if not isinstance(LOCK, contextlib.nullcontext):
        LOCK = threading.Lock()


os.register_at_fork(after_in_child=_fresh_lock_in_child)


# Numba's pool size, fixed when Numba starts (read once: the attribute chain costs a few
# microseconds per call right after a kernel, as every line of this per-call function does).
_POOL_SIZE = max(1, numba.config.NUMBA_NUM_THREADS)
_torch_threads = torch.get_num_threads


def sync_with_torch(numel: int = SERIAL_BELOW, rows: int = 0) -> int:
    """Set Numba's threads (for this calling thread) to torch's, within Numba's pool, or
    to 1 for less work than SERIAL_BELOW (numel elements in ``rows`` (n, c) rows)."""
    if not _pool_started:
        start_pool()
    wanted = 1 if numel + ROW_WEIGHT * rows < SERIAL_BELOW else _torch_threads()
    if wanted > _POOL_SIZE:
        wanted = _POOL_SIZE
    if getattr(_last, "threads", None) != wanted:
        numba.set_num_threads(wanted)
        _last.threads = wanted
    return wanted
