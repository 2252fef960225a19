"""Where the host time of one call goes: per-call wall time without syncs, then a profile.

    python benchmarks/profile_host.py [--shape 1x320x64x64] [--dtype float16]

Small GPU shapes are bound by the host (Python, dispatcher, kernel launches), not the GPU:
this prints ours vs torch per call, the cost of the pieces (an allocation, one Triton
launch, the backend's forward), and the top of a cProfile of forward + backward.
On a machine without CUDA it profiles the glue with the Triton kernels stubbed out.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("GROUPNORM_BACKEND_CPU", "triton")

import torch.nn.functional as F  # noqa: E402

from groupnorm import group_norm  # noqa: E402
from groupnorm.backends.triton_gpu import launch  # noqa: E402

def _no_launch(*args, **kwargs):
    return None


def per_call_us(fn, calls: int = 200) -> float:
    for _ in range(10):
        fn()
    if CUDA:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    if CUDA:
        torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1x320x64x64")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    device = "cuda" if CUDA else "cpu"
    if not CUDA:
        for launcher in launch.LAUNCHERS:   # the interpreter would time the kernels, not the glue
            launcher.fallback = _no_launch
    shape = tuple(int(v) for v in args.shape.split("x"))
    dtype = getattr(torch, args.dtype) if CUDA else torch.float32
    x = torch.randn(shape, device=device, dtype=dtype)
    w = torch.randn(shape[1], device=device, dtype=dtype)
    b = torch.randn(shape[1], device=device, dtype=dtype)
    xg, wg, bg = (t.detach().requires_grad_(True) for t in (x, w, b))
    dy = torch.randn_like(x)

    def ours_fwd():
        with torch.no_grad():
            group_norm(x, 32, w, b)

    def torch_fwd():
        with torch.no_grad():
            F.group_norm(x, 32, w, b)

    def ours_fb():
        torch.autograd.grad(group_norm(xg, 32, wg, bg), (xg, wg, bg), dy)

    def torch_fb():
        torch.autograd.grad(F.group_norm(xg, 32, wg, bg), (xg, wg, bg), dy)

    pieces = {
        "ours forward": ours_fwd, "torch forward": torch_fwd,
        "ours forward+backward": ours_fb, "torch forward+backward": torch_fb,
        "launch.forward (backend only)": lambda: launch.forward(x, w, b, None, None, 32, 1e-5, "none"),
        "launch.apply (one kernel)": lambda: launch.apply(x, torch.zeros(shape[0], 32, device=device),
                                                         torch.ones(shape[0], 32, device=device),
                                                         w, b, None, None, 32, "none"),
        "torch.empty (one allocation)": lambda: torch.empty(shape, device=device, dtype=dtype),
        "torch.zeros (allocation + fill)": lambda: torch.zeros(shape[0], 32, device=device),
    }
    print(f"host time per call, {device} {args.shape} {args.dtype}, no sync per call")
    for label, fn in pieces.items():
        print(f"  {label:34s} {per_call_us(fn):8.1f} us", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        ours_fb()
    prof.disable()
    if CUDA:
        torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumtime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
