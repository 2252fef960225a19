"""Shapes outside the issue-3 suite, ours against ATen through the public API.

    python benchmarks/sweep_shapes.py [--budget 1.2]

The suite (benchmark_cpu.py) holds SD UNet / VAE, detection-neck and video-VAE shapes; a
user's model also has large batches of small maps (detection heads), G = 1 and G = C,
inputs without spatial dims, odd sizes. This sweep looks for performance cliffs there:
it found the contiguous kernels' per-group cost (0.3-0.5x of ATen on 8x1024 and
256x32x8x8 in the thirteenth session). Each row: forward, and forward + backward
(``torch.autograd.grad`` on leaf tensors), interleaved in one process, medians.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import groupnorm  # noqa: E402
from groupnorm.bench.timing import time_interleaved  # noqa: E402

CASES = [
    ((1, 32, 7, 7), 8), ((8, 64, 56, 56), 32), ((64, 256, 4, 4), 32), ((4, 256, 28, 28), 1),
    ((4, 256, 28, 28), 256), ((2, 96, 112, 112), 32), ((1, 512, 32, 32), 32), ((16, 128, 16, 16), 32),
    ((1, 64, 8, 64, 64), 32), ((2, 128, 9, 32, 32), 32), ((32, 64, 32), 8), ((8, 1024), 32),
    ((1, 2048, 16, 16), 32), ((3, 48, 33, 33), 3), ((1, 4, 512, 512), 2), ((256, 32, 8, 8), 32),
]


def row(shape, groups, channels_last, dtype, budget):
    x = torch.randn(shape, dtype=dtype)
    w, b = torch.randn(shape[1], dtype=dtype), torch.randn(shape[1], dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    xg, wg, bg = x.detach().clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    dy = torch.randn_like(x)
    sides = [lambda: groupnorm.group_norm(x, groups, w, b), lambda: F.group_norm(x, groups, w, b),
             lambda: torch.autograd.grad(groupnorm.group_norm(xg, groups, wg, bg), (xg, wg, bg), dy),
             lambda: torch.autograd.grad(F.group_norm(xg, groups, wg, bg), (xg, wg, bg), dy)]
    got = groupnorm.group_norm(x, groups, w, b).double()
    want = F.group_norm(x.double(), groups, w.double(), b.double())
    err = (got - want).abs().max().item()
    ours, aten, ours_fb, aten_fb = [t.median_us for t in time_interleaved(sides, rounds=6, budget_s=budget,
                                                                          max_runs=600)]
    fmt = "NHWC" if channels_last else "NCHW"
    return (f"| {'x'.join(map(str, shape))} | {groups} | {fmt} | {str(dtype)[6:]} | {ours:.1f} | {aten:.1f} | "
            f"{aten / ours:.2f}x | {ours_fb:.1f} | {aten_fb:.1f} | {aten_fb / ours_fb:.2f}x | {err:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=1.2, help="seconds per row (all four sides)")
    args = parser.parse_args()
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or 'cpu'}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}; medians in us")
    print("| shape | G | format | dtype | fwd ours | fwd ATen | fwd speed-up | fwd+bwd ours | fwd+bwd ATen | "
          "fwd+bwd speed-up | max diff fwd |\n|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for shape, groups in CASES:
        for channels_last in (False, True):
            if channels_last and len(shape) not in (4, 5):
                continue
            for dtype in (torch.float32, torch.bfloat16):
                print(row(shape, groups, channels_last, dtype, args.budget), flush=True)


if __name__ == "__main__":
    main()
