"""Numba CPU GroupNorm vs ATen on the CPU suite; prints a markdown table for BENCHMARKS.md.

    python benchmarks/benchmark_cpu.py            # CPU_SUITE
    python benchmarks/benchmark_cpu.py --quick    # QUICK_SUITE  # noqa: E402
    python benchmarks/benchmark_cpu.py --rows api # public-API rows only (the targets)
    python benchmarks/benchmark_cpu.py --rows module  # GroupNorm modules as a model calls them
    python benchmarks/benchmark_cpu.py --no-compile  # without the torch.compile peer

Rows "fwd" / "bwd" / "fwd+bwd" time the public API (groupnorm.group_norm, autograd)
against F.group_norm the same way ("bwd": the autograd backward alone, forward untimed);
"module ..." rows groupnorm.GroupNorm against torch.nn.GroupNorm (no_grad forward, and a
training forward + backward into the parameters); "kernel ..." rows call the Numba backend directly.
Every row also shows torch.compile of F.group_norm (API rows) and the memory floor (see
groupnorm.bench.cpu).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numba  # noqa: E402
import torch  # noqa: E402

from groupnorm.bench.cpu import (API_PASSES, KERNEL_PASSES, MODULE_PASSES, format_table,  # noqa: E402
                                 run_cpu_benchmark, summary)
from groupnorm.bench.suite import CPU_SUITE, QUICK_SUITE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="run QUICK_SUITE instead of CPU_SUITE")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of timing per side")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both sides (numba follows torch); default: torch's")
    parser.add_argument("--rows", choices=("all", "api", "module", "kernel"), default="all",
                        help="public-API, module, backend-direct rows, or all (default)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = QUICK_SUITE if args.quick else CPU_SUITE
    print(f"torch {torch.__version__}, numba {numba.__version__}, "
          f"threads torch={torch.get_num_threads()} numba={numba.get_num_threads()}")
    passes = {"all": API_PASSES + MODULE_PASSES + KERNEL_PASSES, "api": API_PASSES, "module": MODULE_PASSES,
              "kernel": KERNEL_PASSES}[args.rows]
    if hasattr(os, "getloadavg"):
        print("load average before: %.2f %.2f %.2f" % os.getloadavg())
    rows = run_cpu_benchmark(cases, passes=passes, budget_s=args.budget, compile_peer=not args.no_compile)
    if hasattr(os, "getloadavg"):
        print("load average after: %.2f %.2f %.2f" % os.getloadavg())
    print(format_table(rows))
    print()
    print(summary(rows))


if __name__ == "__main__":
    main()
