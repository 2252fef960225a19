"""The torch.compile peer of every benchmark: one compiled function per callable, and
dynamo's recompile limit lifted so that late rows are compiled too.

A benchmark run specialises one graph per row (shape, dtype, memory format, whether
gradients are needed). Dynamo stops recompiling a function after ``recompile_limit``
(8) specialisations and from then on runs it eagerly without a word, so the peer of
the later rows would be torch eager under the name of torch.compile.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

RECOMPILE_LIMIT = 256
_COMPILED: Dict[Callable, Callable] = {}


def lift_recompile_limits(limit: int = RECOMPILE_LIMIT) -> None:
    import torch._dynamo.config as dynamo_config

    for knob in ("recompile_limit", "cache_size_limit"):   # the name changed across releases
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, max(getattr(dynamo_config, knob), limit))


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=False)``, made once per fn: a static graph per row, as a
    user compiling a model at fixed shapes gets."""
    if fn not in _COMPILED:
        lift_recompile_limits()
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]
