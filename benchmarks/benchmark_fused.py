"""Fused GroupNorm + SiLU (+ scale/shift) vs the unfused composition, eager and compiled.

    python benchmarks/benchmark_fused.py [--quick] [--device cuda] [--no-compile]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from groupnorm.bench.fused import ALL_VARIANTS, VARIANTS, format_table, run_fused_benchmark  # noqa: E402
from groupnorm.bench.suite import CPU_SUITE, GPU_SUITE, QUICK_SUITE  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--budget", type=float, default=0.3)
    parser.add_argument("--cases", default="", help="substring filter on case names")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {','.join(ALL_VARIANTS)} (default: %(default)s)")
    args = parser.parse_args()
    full = GPU_SUITE if args.device == "cuda" else [c for c in CPU_SUITE if c.shape[0] * c.shape[1] <= 1280 * 2][1:4]
    cases = [c for c in (QUICK_SUITE if args.quick else full) if args.cases in c.name]
    dtypes = (torch.float32, torch.bfloat16)
    rows = run_fused_benchmark(cases, args.device, dtypes, variants=tuple(args.variants.split(",")),
                               compile_peer=not args.no_compile, budget_s=args.budget, progress=True)
    print(format_table(rows))


if __name__ == "__main__":
    main()
