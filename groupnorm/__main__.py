"""The main job: ``python -m groupnorm`` checks ours against torch on the present device, then
times both: a correctness table, one speed table (a row per shape x dtype x layout: forward
and training step against torch eager and torch.compile, share of the memory floor) and a
three-line summary. Tables go to stdout as rows are measured; progress (compiles, waits)
goes to stderr. ``--quick`` for a small run, ``--full`` for the detailed suite,
``--plot FILE.png`` for a picture, ``--models`` for diffusers models end to end.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import os
import platform
import subprocess
import sys
import time

import torch

from .backends import registry
from .bench import suite
from .selfcheck import check_case, checks_header, format_check, param_dtype_for


class Progress:
    """Progress lines on stderr, prefixed by what the job is doing (``stage``)."""

    def __init__(self) -> None:
        self.stage = ""
        self.start = time.perf_counter()

    def say(self, text: str) -> None:
        elapsed = time.perf_counter() - self.start
        print(f"  [{elapsed:5.0f} s] {self.stage}{': ' if self.stage else ''}{text}", file=sys.stderr, flush=True)

    def compiling(self, kernel: str, seconds) -> None:
        """A ``compile_notices`` report: a Numba kernel compiling on its first call."""
        if seconds is None:
            self.say(f"compiling CPU kernel {kernel} (first use; cached on disk afterwards) ...")
        else:
            self.say(f"compiled {kernel} in {seconds:.1f} s")


def _machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name}, {os.cpu_count()} cores"


def _commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""


def environment(device: str) -> str:
    versions = [f"torch {torch.__version__}"]
    for mod in ("numba", "triton"):
        try:
            versions.append(f"{mod} {importlib.import_module(mod).__version__}")
        except ImportError:
            pass
    return (f"groupnorm main job, {datetime.datetime.now().isoformat(timespec='seconds')}, commit {_commit()}, "
            f"{device} ({_machine(device)}), {', '.join(versions)}, backend {registry.backend_name(device)}"
            + (f", {torch.get_num_threads()} threads" if device == "cpu" else ""))


def _dtypes(args) -> list:
    if args.dtypes:
        return [getattr(torch, name) for name in args.dtypes.split(",")]
    if args.device == "cuda" or args.full:
        return [torch.float32, torch.bfloat16] + ([torch.float16] if args.device == "cuda" else [])
    return [torch.float32]   # a dtype's kernels take a CPU core about 100 s to compile on first use


def _bench_plan(args) -> list:
    """(case, dtype, layout) of the speed table's rows."""
    if args.quick:
        cases = suite.QUICK_SUITE[:2]
    else:
        cases = suite.GPU_SUITE if args.device == "cuda" else suite.CPU_SUITE
    dtypes = [getattr(torch, name) for name in args.bench_dtypes.split(",")] if args.bench_dtypes else \
        [torch.float16 if args.device == "cuda" else torch.float32]
    return [(case, dtype, layout) for case in cases for dtype in dtypes for layout in ("nchw", "nhwc")]


def ahead_units(args, checks, plan):
    """What a second process compiles ahead on a CPU while this one checks the first dtype:
    the checks of the later dtypes, the speed rows' inputs, largest first (they reach the
    paths the small checks do not), then the rows' torch.compile peers.
    -> (units, {check index: unit index}); see bench.compile_ahead for the unit format."""
    first_dtype = checks[0][1]
    units, owned = [], {}
    for i, (case, dtype, layout) in enumerate(checks):
        if dtype != first_dtype:
            owned[i] = len(units)
            units.append(["calls", case.shape, case.num_groups, str(dtype)[6:],
                          str(param_dtype_for(dtype, "cpu"))[6:], layout])
    if not args.no_bench and not args.full:
        checked = {(case.shape, dtype, layout) for case, dtype, layout in checks}
        units += [["calls", case.shape, case.num_groups, str(dtype)[6:], str(dtype)[6:], layout]
                  for case, dtype, layout in sorted(plan, key=lambda p: -p[0].numel)
                  if (case.shape, dtype, layout) not in checked]
        if not args.no_compile:
            units += [["peers", case.shape, case.num_groups, str(dtype)[6:], layout] for case, dtype, layout in plan]
    return units, owned


def _start_compile_ahead(args, checks, plan, progress):
    """The second process of ``ahead_units`` (see bench.compile_ahead), or None."""
    if args.device != "cpu" or args.serial:
        return None, {}
    units, owned = ahead_units(args, checks, plan)
    if not units:
        return None, {}
    from .bench.compile_ahead import CompileAhead

    progress.say(f"a second process compiles what {len(units)} later steps need meanwhile")
    return CompileAhead(units), owned


def run_correctness(args, checks, ahead, owned, progress) -> list:
    print(checks_header(args.device), flush=True)
    rows = []
    for i, (case, dtype, layout) in enumerate(checks):
        progress.stage = f"correctness {i + 1}/{len(checks)} ({case.name}, {str(dtype)[6:]}, {layout})"
        if ahead is not None and i in owned:
            ahead.wait_for(owned[i], lambda done, total: progress.say(
                f"waiting for the second process's compiles ({done} of {total} units done)"))
        rows.append(check_case(case, dtype, args.device, layout == "nhwc"))
        print(format_check(rows[-1]), flush=True)
    return rows


def run_speed_table(args, plan, ahead, progress) -> list:
    from .bench import overview

    compile_peer = not args.no_compile

    def waiting(done, total):
        progress.say(f"waiting for the second process ({done} of {total} units done)")

    peer_units = []
    if ahead is not None:   # the rows' kernels first: from here on they load, not compile
        progress.stage = "speed table"
        ahead.wait_for(ahead.indices("calls"), waiting)
        peer_units = ahead.indices("peers")
    if args.device == "cpu" and compile_peer:
        from .bench import cpu

        # The second process compiles the peers from the first row on; this one from the
        # last row back, loading what the other has cached, until they meet.
        order = range(len(plan) - 1, -1, -1) if peer_units else range(len(plan))
        for n, i in enumerate(order):
            case, dtype, layout = plan[i]
            progress.stage = f"torch.compile peers {n + 1}/{len(plan)} ({case.name}, {str(dtype)[6:]}, {layout})"
            cached = bool(peer_units) and peer_units[i] in ahead.done
            progress.say("torch.compile(F.group_norm), forward and training step"
                         + (", compiled by the second process" if cached else "")
                         + (" (the first in a process takes longest)" if n == 0 else "") + " ...")
            start = time.perf_counter()
            cpu.prepare_compile_peers(case, dtype, layout)
            progress.say(f"ready in {time.perf_counter() - start:.1f} s")
    if ahead is not None:
        ahead.close()
    load_before = _load()
    print("\nspeed: ours against torch eager and torch.compile (their time / ours: above 1 is faster); "
          "of floor: share of the memory floor ours reaches (a copy of the least bytes a pass moves)", flush=True)
    print(overview.HEADER, flush=True)
    rows = []
    for i, (case, dtype, layout) in enumerate(plan):
        progress.stage = f"speed {i + 1}/{len(plan)} ({case.name}, {str(dtype)[6:]}, {layout})"
        try:
            if args.device == "cuda":
                row = overview.gpu_row(case, dtype, layout, compile_peer)
            else:
                row = overview.cpu_row(case, dtype, layout, args.budget, compile_peer)
        except Exception as exc:   # one broken row must not lose the others
            print(f"| {case.name} | {str(dtype)[6:]} | {layout} | failed: {type(exc).__name__}: "
                  f"{str(exc)[:160]} |", flush=True)
            continue
        rows.append(row)
        print(overview.format_row(row), flush=True)
    if rows:
        print("\n" + overview.summary(rows), flush=True)
    if load_before:
        print(f"(load average over 1 min: {load_before} before the timings, {_load()} after; above the core "
              f"count, other work shared the cores and the times are less reliable)", flush=True)
    return rows


def run_full_suite(args) -> None:
    """The detailed rows of the earlier main job: every pass (public API, modules, backend
    calls), page faults, first-call times, and the fused-epilogue rows."""
    from .bench import fused

    if args.device == "cuda":
        from .bench import gpu as bench
        cases = suite.GPU_SUITE
        rows = bench.run_gpu_benchmark(cases, use_compile=not args.no_compile)
        print(bench.format_table(rows), flush=True)
    else:
        from .bench import cpu as bench
        cases = suite.CPU_SUITE
        rows = bench.run_cpu_benchmark(cases, budget_s=args.budget, compile_peer=not args.no_compile)
        print(bench.format_table(rows) + "\n\n" + bench.summary(rows), flush=True)
    fused_cases = [c for c in cases if c.shape[0] * c.shape[1] <= 2560][:2]
    fused_rows = fused.run_fused_benchmark(fused_cases, args.device, compile_peer=False, budget_s=args.budget)
    print("\nfused epilogue (ours, one pass) vs F.group_norm + separate ops, eager:\n"
          + fused.format_table(fused_rows), flush=True)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m groupnorm", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes only (CI)")
    parser.add_argument("--full", action="store_true",
                        help="the detailed suite: every pass, modules, backend calls, page faults, fused rows")
    parser.add_argument("--no-bench", action="store_true", help="correctness checks only")
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile peer")
    parser.add_argument("--dtypes", help="dtypes of the correctness checks, e.g. float32,bfloat16 (default: "
                                         "float32 on a CPU, with --full or on a GPU also bfloat16 and float16)")
    parser.add_argument("--bench-dtypes", help="dtypes of the speed rows (default float32 on CPU, float16 on GPU)")
    parser.add_argument("--budget", type=float, default=0.2, help="seconds of timing per side and pass")
    parser.add_argument("--serial", action="store_true", help="CPU: no second process compiling ahead")
    parser.add_argument("--threads", type=int, help="CPU threads for both sides (torch's; ours follow torch's), "
                                                    "e.g. 1 on a machine whose other core is busy")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the speed table (needs matplotlib: the 'plot' extra)")
    parser.add_argument("--models", action="store_true",
                        help="diffusers VAE and UNet step end to end: stock vs convert vs convert(fuse=True), "
                             "eager (and torch.compile on a GPU)")
    parser.add_argument("--models-compile", action="store_true",
                        help="--models under torch.compile on a CPU too (minutes of compiling)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = Progress()
    print(environment(args.device), flush=True)
    checks = [(case, dtype, layout) for dtype in _dtypes(args) for case in suite.QUICK_SUITE
              for layout in ("nchw", "nhwc")]
    plan = _bench_plan(args)
    notices = contextlib.nullcontext()
    if args.device == "cpu":
        from .backends.numba_cpu.warmup import compile_notices
        notices = compile_notices(progress.compiling)
    ahead, owned = _start_compile_ahead(args, checks, plan, progress)
    try:
        with notices:
            checked = run_correctness(args, checks, ahead, owned, progress)
            rows = []
            if args.full and not args.no_bench:
                run_full_suite(args)
            elif not args.no_bench:
                rows = run_speed_table(args, plan, ahead, progress)
            if args.plot and rows:
                from .bench.plot import plot_rows
                plot_rows(rows, args.plot, environment(args.device))
                print(f"\nplot written to {args.plot}", flush=True)
            if args.models:
                from .bench import models
                progress.stage = "models"
                models.run(args.device, say=progress.say, compile_peer=not args.no_compile and (
                    args.device == "cuda" or args.models_compile))
    finally:
        if ahead is not None:
            ahead.close()
    failed = [r for r in checked if not r["ok"]]
    if failed:
        print(f"{len(failed)} correctness check(s) FAILED", file=sys.stderr)
        return 1
    print(f"all {len(checked)} correctness checks passed; {time.perf_counter() - progress.start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
