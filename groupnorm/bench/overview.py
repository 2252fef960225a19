"""The main job's speed table: one row per shape x dtype x layout, and a three-line summary.

A row compares ours, through the public API, with torch eager (``F.group_norm``) and with
``torch.compile(F.group_norm)`` on the same inputs, for a forward and for a training step
(forward, then the gradients of x, weight and bias). Speed-ups are their time over ours
(above 1: ours is faster). "of floor" is the share of the memory floor ours reaches: the
time the least bytes a pass must move take at the speed of a plain copy on this device,
over our time (100%: as fast as a copy could be). The detailed rows behind it come from
``bench.cpu`` / ``bench.gpu`` (``python -m groupnorm --full`` prints those).
"""
from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from .suite import Case

LAYOUTS = ("nchw", "nhwc")


@dataclass
class Row:
    case: str
    shape: tuple
    dtype: str
    layout: str
    fwd_us: float
    train_us: float
    fwd_vs_eager: float
    train_vs_eager: float
    fwd_vs_compile: Optional[float]
    train_vs_compile: Optional[float]
    fwd_floor: float          # share of the memory floor ours reaches, forward
    train_floor: float        # the same, training step
    fwd_gbps: float           # least bytes of the pass / our time
    train_gbps: float
    floor_gbps: float         # a copy's speed on a tensor of x's size (the floor's unit)


def cpu_row(case: Case, dtype: torch.dtype, layout: str, budget_s: float, compile_peer: bool) -> Row:
    from . import cpu

    fwd, train = cpu.run_cpu_benchmark([case], dtypes=(dtype,), formats=(layout,), passes=("fwd", "fwd+bwd"),
                                       budget_s=budget_s, compile_peer=compile_peer, faults=False)
    x_bytes = math.prod(case.shape) * torch.empty((), dtype=dtype).element_size()
    return Row(case.name, case.shape, fwd["dtype"], layout, fwd["ours_us"], train["ours_us"],
               fwd["speedup"], train["speedup"], fwd["vs_compile"], train["vs_compile"],
               fwd["floor_ours"], train["floor_ours"],
               cpu.FLOOR_PASSES["fwd"] * x_bytes / fwd["ours_us"] / 1e3,
               cpu.FLOOR_PASSES["fwd+bwd"] * x_bytes / train["ours_us"] / 1e3,
               2 * x_bytes / fwd["copy_us"] / 1e3)


def gpu_row(case: Case, dtype: torch.dtype, layout: str, compile_peer: bool, device: str = "cuda") -> Row:
    """The same row from ``bench.gpu`` (its own per-pass lines are not printed here)."""
    from . import gpu

    with contextlib.redirect_stdout(io.StringIO()):
        rows = gpu.run_gpu_benchmark([case], dtypes=(dtype,), formats=("channels_last" if layout == "nhwc"
                                                                       else "nchw",),
                                     use_compile=compile_peer, device=device)
    by_pass = {r["pass"]: r for r in rows}
    fwd, train = by_pass.get("forward"), by_pass.get("forward_backward")
    if fwd is None or train is None or "error" in fwd or "error" in train:
        reason = next((r.get("error") for r in rows if "error" in r), "no rows")
        raise RuntimeError(f"{case.name} {layout}: {reason}")
    return Row(case.name, case.shape, fwd["dtype"], layout, fwd["ours_us"], train["ours_us"],
               fwd["speedup_torch"], train["speedup_torch"], fwd["speedup_compile"], train["speedup_compile"],
               fwd["pct_copy_bw"] / 100, train["pct_copy_bw"] / 100, fwd["ours_gbps"], train["ours_gbps"],
               fwd["copy_gbps"])


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _t(us: float) -> str:
    return f"{us / 1e3:.2f}" if us >= 100 else f"{us / 1e3:.3f}"


HEADER = ("| shape | dtype | layout | forward ms | vs eager | vs compile | training step ms | vs eager "
          "| vs compile | of floor: fwd, train |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|")


def format_row(r: Row) -> str:
    return (f"| {r.case} | {r.dtype} | {r.layout} | {_t(r.fwd_us)} | {_x(r.fwd_vs_eager)} | "
            f"{_x(r.fwd_vs_compile)} | {_t(r.train_us)} | {_x(r.train_vs_eager)} | {_x(r.train_vs_compile)} | "
            f"{100 * r.fwd_floor:.0f}%, {100 * r.train_floor:.0f}% |")


def geomean(values) -> float:
    values = [v for v in values if v is not None]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summary(rows: List[Row]) -> str:
    """Three lines: geometric means against eager, against torch.compile and of the floor
    share; then the worst row (the lowest speed-up of any column)."""
    n = len(rows)
    lines = [f"Against torch eager ({n} rows, geometric mean): forward {geomean(r.fwd_vs_eager for r in rows):.2f}x, "
             f"training step {geomean(r.train_vs_eager for r in rows):.2f}x"]
    peer = [r for r in rows if r.fwd_vs_compile is not None and r.train_vs_compile is not None]
    compile_part = (f"Against torch.compile ({len(peer)} rows): forward {geomean(r.fwd_vs_compile for r in peer):.2f}x, "
                    f"training step {geomean(r.train_vs_compile for r in peer):.2f}x"
                    if peer else "Against torch.compile: not measured")
    lines.append(f"{compile_part}; share of the memory floor: forward "
                 f"{100 * geomean(r.fwd_floor for r in rows):.0f}%, training step "
                 f"{100 * geomean(r.train_floor for r in rows):.0f}%")
    cells = [(getattr(r, key), r, label) for r in rows
             for key, label in (("fwd_vs_eager", "forward vs eager"), ("fwd_vs_compile", "forward vs compile"),
                                ("train_vs_eager", "training step vs eager"),
                                ("train_vs_compile", "training step vs compile"))
             if getattr(r, key) is not None]
    if cells:
        value, r, label = min(cells, key=lambda c: c[0])
        lines.append(f"Worst row: {r.case} {r.dtype} {r.layout}, {label} {value:.2f}x")
    return "\n".join(lines)
