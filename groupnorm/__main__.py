"""The main job: ``python -m groupnorm`` checks ours against torch on the present device and
times both, printing markdown tables (``--quick`` for a small suite, ``--help`` for options)."""
from __future__ import annotations

import argparse
import datetime
import importlib
import platform
import sys
import time

import torch

from .backends import registry
from .bench import suite
from .selfcheck import format_checks, run_checks


def _environment(device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    versions = [f"torch {torch.__version__}"]
    for mod in ("numba", "triton"):
        try:
            versions.append(f"{mod} {importlib.import_module(mod).__version__}")
        except ImportError:
            pass
    return (f"groupnorm main job — {datetime.datetime.now().isoformat(timespec='seconds')} — "
            f"{device} ({name}), {', '.join(versions)}, backend {registry.backend_name(device)}")


def _first_call_cost(device: str) -> str | None:
    """Compile cost of the kernels on first use (Numba caches it on disk afterwards)."""
    backend = registry.backend_for(device)
    warm = getattr(backend, "warmup", None)
    if warm is None:
        return None
    t0 = time.perf_counter()
    reported = warm()
    seconds = reported if isinstance(reported, (int, float)) else time.perf_counter() - t0
    return f"first-call compile/load cost of the {registry.backend_name(device)} kernels: {seconds:.2f} s"


def _benchmark(device: str, quick: bool, budget_s: float, compile_peer: bool = True) -> str:
    if device == "cuda":
        from .bench import gpu as bench
        cases = suite.QUICK_SUITE if quick else suite.GPU_SUITE
        rows = bench.run_gpu_benchmark(cases, use_compile=compile_peer)
    else:
        from .bench import cpu as bench
        cases = suite.QUICK_SUITE if quick else suite.CPU_SUITE
        rows = bench.run_cpu_benchmark(cases, budget_s=budget_s, compile_peer=compile_peer)
    table = bench.format_table(rows)
    from .bench import fused
    fused_cases = suite.QUICK_SUITE[:1] if quick else [c for c in cases if c.shape[0] * c.shape[1] <= 2560][:2]
    fused_rows = fused.run_fused_benchmark(fused_cases, device, compile_peer=False, budget_s=budget_s)
    return table + "\n\nfused epilogue (ours, one pass) vs F.group_norm + separate ops, eager:\n" + fused.format_table(fused_rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m groupnorm", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes only (seconds, not minutes)")
    parser.add_argument("--no-bench", action="store_true", help="correctness checks only")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timing per measurement")
    parser.add_argument("--no-compile", action="store_true", help="benchmarks without the torch.compile peer")
    args = parser.parse_args(argv)

    print(_environment(args.device), flush=True)
    cost = _first_call_cost(args.device)
    if cost:
        print(cost, flush=True)
    dtypes = [torch.float32, torch.bfloat16, torch.float16] if args.device == "cuda" else [torch.float32, torch.bfloat16]
    rows = run_checks(suite.QUICK_SUITE, args.device, dtypes)
    print(format_checks(rows, args.device), flush=True)
    failed = [r for r in rows if not r["ok"]]
    if not args.no_bench:
        print(_benchmark(args.device, args.quick, args.budget, not args.no_compile), flush=True)
    if failed:
        print(f"{len(failed)} correctness check(s) FAILED", file=sys.stderr)
        return 1
    print("all correctness checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
