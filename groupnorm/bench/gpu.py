"""GPU benchmark rows: ours vs torch eager, torch.compile and (if installed) Liger-Kernel.

Per (case, dtype, memory format, pass): check ours against torch first, then time every
peer with CUDA events (median, p20/p80), count the bytes a memory-bound kernel must move,
and report GB/s next to the measured device-to-device copy bandwidth of the same size.
Host wall time per call (launch overhead, no sync per call) is reported for ours and torch.
Each peer is guarded: one failing peer gives an empty cell, never a lost run.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F

from .compile_peer import lift_recompile_limits
from .suite import Case
from .timing import time_fn

PASSES = ("forward", "forward_backward")
FORMATS = ("nchw", "channels_last")
COLUMNS = ["case", "shape", "groups", "dtype", "format", "pass", "max_err", "ours_us",
           "torch_us", "compile_us", "liger_us", "ours_gbps", "copy_gbps", "pct_copy_bw",
           "speedup_torch", "speedup_compile", "speedup_liger", "ours_host_us", "torch_host_us"]


def _ours_fn():
    from groupnorm.functional import group_norm  # the public op (Triton backend on CUDA)
    return group_norm


def _liger_fn() -> Optional[Callable]:
    try:
        from liger_kernel.ops.group_norm import LigerGroupNormFunction
    except Exception:
        return None

    def liger(x, num_groups, w, b, eps):
        return LigerGroupNormFunction.apply(x, w, b, x.shape[1], num_groups, eps)
    return liger


_COMPILED: Dict[str, Callable] = {}


def _compiled_group_norm() -> Callable:
    """torch.compile(F.group_norm) with automatic dynamic shapes (fewer compiles on a short
    GPU lease than one static graph per row), and dynamo's recompile limit lifted: past it
    the later rows' peer would silently be torch eager."""
    if "f" not in _COMPILED:
        lift_recompile_limits()
        _COMPILED["f"] = torch.compile(F.group_norm)
    return _COMPILED["f"]


def _layout(x: torch.Tensor, fmt: str) -> torch.Tensor:
    return x.movedim(1, -1).contiguous().movedim(-1, 1) if fmt == "channels_last" else x.contiguous()


def _pass_fn(fn, x, g, w, b, dy, pass_name):
    # A zero-argument callable running one forward (and backward) of ``fn``.
    if pass_name == "forward":
        return lambda: fn(x, g, w, b, 1e-5)

    def fwd_bwd():
        y = fn(x, g, w, b, 1e-5)
        torch.autograd.grad(y, (x, w, b), dy)
    return fwd_bwd


def _time_us(fn, device) -> Optional[float]:
    try:
        return time_fn(fn, device, warmup=3, min_runs=10, max_runs=100, budget_s=0.3).median_us
    except Exception:
        return None


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _host_us(fn, device, calls: int = 50) -> Optional[float]:
    # Wall time per call without a sync per call: the launch overhead a CPU-bound loop sees.
    try:
        fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        _sync(device)
        return (t1 - t0) / calls * 1e6
    except Exception:
        return None


def copy_bandwidth_gbps(numel: int, dtype: torch.dtype, device) -> float:
    """Measured device-to-device copy (read + write) bandwidth for a tensor of this size."""
    src = torch.empty(numel, dtype=dtype, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, min_runs=10, max_runs=100, budget_s=0.3)
    return 2 * numel * src.element_size() / t.median_s / 1e9


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or a == 0 else b / a


def run_gpu_benchmark(cases: Iterable[Case], dtypes: Iterable[torch.dtype] = (torch.float16,),
                      formats: Iterable[str] = FORMATS, passes: Iterable[str] = PASSES,
                      device: str = "cuda", use_compile: bool = True) -> List[dict]:
    """One row per (case, dtype, format, pass); correctness is checked before timing.

    ``use_compile=False`` skips the torch.compile peer (its compiles take most of a short run).
    """
    ours = _ours_fn()
    liger = _liger_fn()
    rows: List[dict] = []
    for case in cases:
        for dtype in dtypes:
            for fmt in formats:
                if fmt == "channels_last" and len(case.shape) < 3:
                    continue
                x = _layout(torch.randn(case.shape, device=device, dtype=dtype) * 0.5 - 2.3, fmt)
                c = case.shape[1]
                pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
                w = torch.randn(c, device=device, dtype=pdt)
                b = torch.randn(c, device=device, dtype=pdt)
                # torch's group_norm wants weight in x's dtype.
                wt, bt = w.to(dtype), b.to(dtype)
                dy = torch.randn_like(x)
                copy_gbps = copy_bandwidth_gbps(x.numel(), dtype, device)
                for pass_name in passes:
                    row = _row(case, dtype, fmt, pass_name, x, w, b, wt, bt, dy, ours, liger, copy_gbps,
                               use_compile)
                    rows.append(row)
                    print(format_table([row], header=not rows[:-1]), flush=True)
                del x, dy
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def _row(case, dtype, fmt, pass_name, x, w, b, wt, bt, dy, ours, liger, copy_gbps,
         use_compile=True) -> dict:
    device = x.device
    g = case.num_groups
    fwd_bwd = pass_name != "forward"
    xs = x.detach().requires_grad_(fwd_bwd)
    ws = w.detach().requires_grad_(fwd_bwd)
    bs = b.detach().requires_grad_(fwd_bwd)
    wts = wt.detach().requires_grad_(fwd_bwd)
    bts = bt.detach().requires_grad_(fwd_bwd)

    def ours_call(x_, g_, w_, b_, eps):
        return ours(x_, g_, w_, b_, eps)

    row = dict(case=case.name, shape="x".join(map(str, case.shape)), groups=g,
               dtype=str(dtype).replace("torch.", ""), format=fmt, **{"pass": pass_name})
    try:
        with torch.no_grad():
            y = ours(x, g, w, b, 1e-5)
            ref = F.group_norm(x.float(), g, w.float(), b.float(), 1e-5)
            max_err = (y.float() - ref).abs().max().item()
    except Exception as exc:  # a broken op must not lose the other rows
        row["error"] = f"ours failed: {type(exc).__name__}: {exc}"[:200]
        return row
    row["max_err"] = max_err
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not math.isfinite(max_err) or max_err > tol * max(1.0, ref.abs().max().item()):
        row["error"] = f"ours differs from torch by {max_err:g}"
        return row

    f_ours = _pass_fn(ours_call, xs, g, ws, bs, dy, pass_name)
    f_torch = _pass_fn(F.group_norm, xs, g, wts, bts, dy, pass_name)
    row["ours_us"] = _time_us(f_ours, device)
    row["torch_us"] = _time_us(f_torch, device)
    row["compile_us"] = None
    try:
        if use_compile:
            row["compile_us"] = _time_us(_pass_fn(_compiled_group_norm(), xs, g, wts, bts, dy, pass_name),
                                         device)
    except Exception:
        row["compile_us"] = None
    row["liger_us"] = None
    if liger is not None:
        try:
            xl = xs.detach().contiguous().requires_grad_(fwd_bwd)
            row["liger_us"] = _time_us(_pass_fn(liger, xl, g, wts, bts, dy.contiguous(), pass_name), device)
        except Exception:
            row["liger_us"] = None
    # Least bytes moved: forward reads x, writes y; forward + backward adds x, dy read, dx written.
    moved = 2 * x.numel() * x.element_size() if not fwd_bwd else 5 * x.numel() * x.element_size()
    if row["ours_us"]:
        row["ours_gbps"] = moved / (row["ours_us"] * 1e-6) / 1e9
        row["copy_gbps"] = copy_gbps
        row["pct_copy_bw"] = 100.0 * row["ours_gbps"] / copy_gbps
    row["speedup_torch"] = _ratio(row["ours_us"], row["torch_us"])
    row["speedup_compile"] = _ratio(row["ours_us"], row["compile_us"])
    row["speedup_liger"] = _ratio(row["ours_us"], row["liger_us"])
    row["ours_host_us"] = _host_us(f_ours, device)
    row["torch_host_us"] = _host_us(f_torch, device)
    return row


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 else f"{v:.2f}"
    return str(v)


def format_table(rows: List[dict], header: bool = True) -> str:
    """Markdown table of the rows (an ``error`` column appears when any row has one)."""
    cols = COLUMNS + (["error"] if any("error" in r for r in rows) else [])
    lines = []
    if header:
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def write_csv(rows: List[dict], path: str) -> None:
    import csv

    cols = COLUMNS + ["error"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c) for c in cols})
