"""Numba's worker count follows torch's, so the two pools never oversubscribe the cores.

Results never depend on this number: every kernel partitions its work by shape only.
"""
from __future__ import annotations

import numba
import torch


def sync_with_torch() -> int:
    """Set Numba's threads (for this calling thread) to torch's, within Numba's pool."""
    wanted = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
    return wanted
