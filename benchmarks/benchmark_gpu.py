"""GPU benchmark of the Triton GroupNorm against torch eager, torch.compile and Liger-Kernel.

    python benchmarks/benchmark_gpu.py --quick --out results/gpu
writes results/gpu.csv and results/gpu.md (device, versions, git sha and date on top).
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def _git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="three suite shapes (batch 1 and 8, fused and split paths)")
    parser.add_argument("--out", default="benchmark_gpu", help="output path prefix (.csv and .md are added)")
    parser.add_argument("--dtypes", default="float16", help="comma list of float16,bfloat16,float32")
    parser.add_argument("--formats", default="nchw,channels_last", help="comma list of nchw,channels_last")
    parser.add_argument("--passes", default="forward,forward_backward", help="comma list of forward,forward_backward")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    parser.add_argument("--cases", default="", help="substring filter on case names")
    args = parser.parse_args(argv)

    import torch

    from groupnorm.bench.gpu import format_table, run_gpu_benchmark, write_csv
    from groupnorm.bench.suite import GPU_SUITE

    if not torch.cuda.is_available():
        print("benchmark_gpu: CUDA is not available", file=sys.stderr)
        return 2
    cases = [c for c in GPU_SUITE if args.cases in c.name]
    dtypes = [getattr(torch, DTYPES[d]) for d in args.dtypes.split(",") if d]
    formats = [f for f in args.formats.split(",") if f]
    passes = [p for p in args.passes.split(",") if p]
    if args.quick:
        cases = [c for c in cases if "b8 1280x8x8" in c.name or "b1 320x64x64" in c.name
                 or "b1 128x512x512" in c.name] or cases[:3]
    rows = run_gpu_benchmark(cases, dtypes, formats, passes, use_compile=not args.no_compile)

    import triton

    head = (f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}"
            f"  git {_git_sha()}  {datetime.datetime.now().isoformat(timespec='seconds')}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, args.out + ".csv")
    with open(args.out + ".md", "w") as f:
        f.write(head + "\n\n" + format_table(rows) + "\n")
    print(head)
    print(f"wrote {args.out}.csv and {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
