"""Autocast rules for groupnorm's ops, so ``torch.autocast`` treats them as it treats group_norm.

Custom ops are invisible to autocast's op lists: without a rule they would run in whatever
dtype they are handed. torch's own rule for group_norm differs by device:

  cuda  group_norm is on the float32 list: half inputs *and parameters* are cast to float32,
        the output is float32. We register the same cast (float64 stays float64, as in torch).
  cpu   group_norm is on no list: it runs in the input's dtype (bf16 in, bf16 out; float32 in,
        float32 out). Doing nothing is already that rule, so no CPU rule is registered.

Only the ops that produce a normalised output get a rule (``forward`` and ``apply``);
``stats`` computes in float32 regardless, and the backward ops run outside autocast.
"""
from __future__ import annotations

import torch

# (op, device type, dtype its floating inputs are cast to under autocast)
RULES = (
    ("groupnorm::forward", "cuda", torch.float32),
    ("groupnorm::apply", "cuda", torch.float32),
)


def register() -> None:
    """Install RULES; called once by ``groupnorm.ops`` after the ops are defined."""
    for op, device_type, dtype in RULES:
        # register_autocast (torch >= 2.7) refuses device types autocast does not know.
        if torch.amp.is_autocast_available(device_type):
            torch.library.register_autocast(op, device_type, dtype)
