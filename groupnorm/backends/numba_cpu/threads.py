"""Numba's worker count follows torch's, so the two pools never oversubscribe the cores.

Results never depend on this number: every kernel partitions its work by shape only.
"""
from __future__ import annotations

import numba
import torch


# Below this many elements a fork/join costs more than the work: run on the calling thread.
SERIAL_BELOW = 1 << 15


def sync_with_torch(numel: int = SERIAL_BELOW) -> int:
    """Set Numba's threads (for this calling thread) to torch's, within Numba's pool."""
    wanted = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numel < SERIAL_BELOW:
        wanted = 1
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
    return wanted
