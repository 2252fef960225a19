"""A whole diffusion ResNet block on the CPU, before and after the one-line swap.

    python benchmarks/benchmark_block.py [--budget 2.0] [--threads N]

Why: a GroupNorm timed alone cannot show what it does to its neighbours. Our Numba kernels
run on their own OpenMP pool (a second libgomp next to torch's); threads that spin after a
parallel region could slow the convolutions around the norm. This times the block users
run — GroupNorm, SiLU, 3x3 conv, GroupNorm, SiLU, 3x3 conv, residual — with torch's
modules against ``groupnorm.convert(block, fuse=True)`` (same parameters), alternating the
two in rounds, forward under no_grad and forward+backward, and checks the outputs agree.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import groupnorm  # noqa: E402
from groupnorm.bench.timing import time_interleaved  # noqa: E402

SHAPES = [(1, 128, 128, 128), (2, 320, 32, 32), (2, 640, 16, 16), (2, 1280, 8, 8)]


class ResnetBlock(nn.Module):
    """The shape of diffusers' ResnetBlock2D without the time embedding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):
        return x + self.branch(x)


def _fwd(block, x):
    def run():
        with torch.no_grad():
            return block(x)
    return run


def _fwd_bwd(block, x):
    def run():
        block.zero_grad(set_to_none=True)
        y = block(x)
        y.backward(torch.ones_like(y))
        return y
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing per row")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if hasattr(os, "getloadavg"):
        print("load average before: %.2f %.2f %.2f" % os.getloadavg())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{'channels_last' if args.channels_last else 'contiguous'}, float32")
    print("| block input | pass | torch us | groupnorm us | speed-up | max diff |")
    print("|---|---|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for shape in SHAPES:
        theirs = ResnetBlock(shape[1])
        ours = groupnorm.convert(copy.deepcopy(theirs), fuse=True)
        x = torch.randn(shape)
        if args.channels_last:
            x = x.to(memory_format=torch.channels_last)
            theirs, ours = theirs.to(memory_format=torch.channels_last), ours.to(memory_format=torch.channels_last)
        for name, make in (("fwd", _fwd), ("fwd+bwd", _fwd_bwd)):
            a, b = make(theirs, x), make(ours, x)
            diff = (a() - b()).abs().max().item()
            t_theirs, t_ours = time_interleaved([a, b], budget_s=args.budget, warmup=2, min_runs=10)
            print(f"| {'x'.join(map(str, shape))} | {name} | {t_theirs.median_us:.0f} | {t_ours.median_us:.0f} "
                  f"| {t_theirs.median_s / t_ours.median_s:.2f}x | {diff:.1e} |")
    if hasattr(os, "getloadavg"):
        print("load average after: %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
