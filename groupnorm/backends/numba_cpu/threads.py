"""Numba's worker count follows torch's, so the two never oversubscribe the cores.

With the Linux torch wheels the two even share one OpenMP runtime: torch loads its bundled
libgomp into the global symbol scope, and Numba's OpenMP layer (which names the system
``libgomp.so.1.0.0``) binds ``GOMP_parallel`` and ``omp_*`` there first (checked with
``LD_DEBUG=bindings``; one worker thread runs both libraries' regions). That is also why a
Numba pool start could reset torch's thread count (see start_pool).

Results never depend on this number: every kernel partitions its work by shape only.
"""
from __future__ import annotations

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


def start_pool() -> None:
    """Start Numba's worker pool without disturbing torch's thread count.

    Numba's OpenMP layer resets the process's OpenMP thread count when it starts its
    pool, which silently undid a user's ``torch.set_num_threads(1)``; we start it once,
    here, and put torch's setting back.
    """
    global _pool_started
    if _pool_started:
        return
    torch_threads = torch.get_num_threads()
    numba.get_num_threads()   # starts the pool
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    _pool_started = True


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
