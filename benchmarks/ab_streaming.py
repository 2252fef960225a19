"""Streamed against plain output stores in one process, and both against ATen.

Why a separate script: whether streaming stores pay depends on the machine's load, so
the two variants are timed alternately in the same process (the streaming limits switched
per block of calls: every output streamed, half types included, or none), three blocks
each, ATen's call in between; the medians go to BENCHMARKS.md ("Current: streaming
stores"). Usage: ``python benchmarks/ab_streaming.py fwd`` or ``... bwd`` (threads as
torch has them).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import groupnorm  # noqa: E402
from groupnorm.backends.numba_cpu import streaming  # noqa: E402

SHAPES = [(2, 320, 64, 64), (1, 512, 64, 64), (2, 256, 100, 152), (1, 128, 512, 512)]
GROUPS = 32
LIMITS = ("STREAM_MIN_BYTES", "STREAM_MIN_BYTES_CHANNELS_LAST", "STREAM_MIN_BYTES_BACKWARD",
          "STREAM_MIN_ITEMSIZE")


def median_us(fn, reps: int = 15, inner: int = 3) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times) * 1e6


def set_streaming(on, defaults: dict) -> None:
    """Every output streamed (on), none (off), or the package's limits back (None)."""
    for name in LIMITS:
        if on is None:
            value = defaults[name]
        else:
            value = 0 if on or name == "STREAM_MIN_ITEMSIZE" else 1 << 62
        setattr(streaming, name, value)


def calls(x, weight, bias, which: str):
    """(ours, aten) callables for the forward or for autograd.grad alone."""
    if which == "fwd":
        return (lambda: groupnorm.group_norm(x, GROUPS, weight, bias),
                lambda: F.group_norm(x, GROUPS, weight, bias))
    xr, wr, br = (t.detach().requires_grad_() for t in (x, weight, bias))
    dy = torch.randn_like(x)
    y_ours = groupnorm.group_norm(xr, GROUPS, wr, br)
    y_aten = F.group_norm(xr, GROUPS, wr, br)
    return (lambda: torch.autograd.grad(y_ours, (xr, wr, br), dy, retain_graph=True),
            lambda: torch.autograd.grad(y_aten, (xr, wr, br), dy, retain_graph=True))


def main(which: str) -> None:
    defaults = {name: getattr(streaming, name) for name in LIMITS}
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for channels_last in (False, True):
                g = torch.Generator().manual_seed(0)
                x = torch.randn(shape, generator=g).to(dtype)
                if channels_last:
                    x = x.to(memory_format=torch.channels_last)
                weight = torch.randn(shape[1], generator=g).to(dtype)
                bias = torch.randn(shape[1], generator=g).to(dtype)
                ours, aten = calls(x, weight, bias, which)
                times = {"plain": [], "stream": [], "aten": []}
                for _ in range(3):
                    for mode in times:
                        if mode != "aten":
                            set_streaming(mode == "stream", defaults)
                        fn = aten if mode == "aten" else ours
                        fn()
                        times[mode].append(median_us(fn))
                set_streaming(None, defaults)
                plain, stream, ref = (statistics.median(times[k]) for k in ("plain", "stream", "aten"))
                mib = x.numel() * x.element_size() / 2 ** 20
                print(f"{which} {shape} {str(dtype)[6:]} {'cl' if channels_last else 'nchw'} {mib:.1f}MB "
                      f"plain {plain:.0f} stream {stream:.0f} aten {ref:.0f} us | stream/plain "
                      f"{plain / stream:.2f}x, vs ATen plain {ref / plain:.2f}x stream {ref / stream:.2f}x",
                      flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fwd")
