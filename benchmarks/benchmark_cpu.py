"""Numba CPU GroupNorm vs ATen on the CPU suite; prints a markdown table for BENCHMARKS.md.

    python benchmarks/benchmark_cpu.py            # CPU_SUITE
    python benchmarks/benchmark_cpu.py --quick    # QUICK_SUITE  # noqa: E402
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numba  # noqa: E402
import torch  # noqa: E402

from groupnorm.bench.cpu import format_table, run_cpu_benchmark, summary  # noqa: E402
from groupnorm.bench.suite import CPU_SUITE, QUICK_SUITE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="run QUICK_SUITE instead of CPU_SUITE")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of timing per side")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both sides (numba follows torch); default: torch's")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = QUICK_SUITE if args.quick else CPU_SUITE
    print(f"torch {torch.__version__}, numba {numba.__version__}, "
          f"threads torch={torch.get_num_threads()} numba={numba.get_num_threads()}")
    rows = run_cpu_benchmark(cases, budget_s=args.budget)
    print(format_table(rows))
    print()
    print(summary(rows))


if __name__ == "__main__":
    main()
