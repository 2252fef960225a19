"""Time the Triton kernels under several launch plans (plan.py's knobs) in one process.

    python benchmarks/tune_gpu.py [--budget-s 90] [--shapes 1x256x1024x1024,...]

For each variant the knobs are set on ``groupnorm.backends.triton_gpu.plan``, then the public
op runs forward and forward+backward on each shape and format (float16 by default), checked
against torch first. Rows print as they are measured; a time box stops the sweep cleanly.
Without CUDA it runs tiny shapes through the Triton interpreter (a smoke test of the script).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("GROUPNORM_BACKEND_CPU", "triton")

import torch.nn.functional as F  # noqa: E402

from groupnorm import group_norm  # noqa: E402
from groupnorm.backends.triton_gpu import plan  # noqa: E402
from groupnorm.bench.gpu import copy_bandwidth_gbps  # noqa: E402
from groupnorm.bench.timing import time_fn  # noqa: E402

VARIANTS = {
    "base": {},
    "nchw_waves4": {"WAVES_PER_SM_NCHW": 4},
    "waves8": {"WAVES_PER_SM": 8},
    "waves16": {"WAVES_PER_SM": 16},
    "waves32": {"WAVES_PER_SM": 32},
    "block2048": {"LOOP_BLOCK": 2048},
    "block4096": {"LOOP_BLOCK": 4096},
    "waves16+block2048": {"WAVES_PER_SM": 16, "LOOP_BLOCK": 2048},
    "waves16+block4096": {"WAVES_PER_SM": 16, "LOOP_BLOCK": 4096},
    "tile4096": {"REDUCE_TILE": 4096},
    "waves16+tile4096": {"WAVES_PER_SM": 16, "REDUCE_TILE": 4096},
    "fused4096": {"FUSED_MAX_GROUP": 4096},
    "fused16384": {"FUSED_MAX_GROUP": 16384},
}
GPU_SHAPES = "1x256x1024x1024,8x512x128x128,1x128x512x512,8x1280x32x32,8x320x64x64,1x640x64x64"


def _shape(text: str):
    return tuple(int(v) for v in text.split("x"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=GPU_SHAPES if torch.cuda.is_available() else "2x64x6x5")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--budget-s", type=float, default=90.0, help="stop the sweep after this long")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    defaults = {k: getattr(plan, k) for v in VARIANTS.values() for k in v}
    start = time.perf_counter()
    print("| variant | shape | format | fwd us | fwd+bwd us | fwd % copy | fwd+bwd % copy | max err |")
    print("|---|---|---|---:|---:|---:|---:|---:|", flush=True)
    for name in args.variants.split(","):
        for key, value in defaults.items():
            setattr(plan, key, VARIANTS[name].get(key, value))
        for text in args.shapes.split(","):
            shape = _shape(text)
            for fmt in ("nchw", "nhwc"):
                if time.perf_counter() - start > args.budget_s:
                    print("time box reached", flush=True)
                    return 0
                x = torch.randn(shape, device=device, dtype=dtype) * 0.5 - 2.3
                if fmt == "nhwc":
                    x = x.movedim(1, -1).contiguous().movedim(-1, 1)
                c = shape[1]
                w = torch.randn(c, device=device, dtype=dtype)
                b = torch.randn(c, device=device, dtype=dtype)
                with torch.no_grad():
                    err = (group_norm(x, 32, w, b).float() - F.group_norm(x.float(), 32, w.float(), b.float())
                           ).abs().max().item()
                xg, wg, bg = (t.detach().requires_grad_(True) for t in (x, w, b))
                dy = torch.randn_like(x)

                def fwd():
                    with torch.no_grad():
                        group_norm(x, 32, w, b)

                def fwd_bwd():
                    torch.autograd.grad(group_norm(xg, 32, wg, bg), (xg, wg, bg), dy)

                t_f = time_fn(fwd, device, warmup=3, min_runs=10, max_runs=60, budget_s=0.15).median_us
                t_fb = time_fn(fwd_bwd, device, warmup=3, min_runs=10, max_runs=60, budget_s=0.15).median_us
                copy = copy_bandwidth_gbps(x.numel(), dtype, device)
                nbytes = x.numel() * x.element_size()
                pct_f = 100 * (2 * nbytes / (t_f * 1e-6) / 1e9) / copy
                pct_fb = 100 * (5 * nbytes / (t_fb * 1e-6) / 1e9) / copy
                print(f"| {name} | {text} | {fmt} | {t_f:.1f} | {t_fb:.1f} | {pct_f:.0f} | {pct_fb:.0f} | {err:.2g} |",
                      flush=True)
                del x, xg, dy
    return 0


if __name__ == "__main__":
    sys.exit(main())
