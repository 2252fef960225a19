"""CPU benchmark rows: groupnorm against ATen's GroupNorm, same process, same inputs.

Each row is checked first (max |ours - ATen|), then timed with ``timing.time_interleaved`` on both
sides. Two kinds of rows:

* public API (what users see; the issue-3 targets are stated in these):
  "fwd" is ``groupnorm.group_norm`` against ``F.group_norm``; "fwd+bwd" is the same call
  on leaf tensors that require grad, then ``torch.autograd.grad`` of (x, weight, bias),
  on both sides identically (custom-op dispatch, autograd graph and all); "bwd" times
  that ``torch.autograd.grad`` alone, each call on a fresh graph whose forward ran
  untimed just before (the backward target of issue 3 is stated for the backward).
* modules ("module fwd", "module fwd+bwd"): ``groupnorm.GroupNorm`` against
  ``torch.nn.GroupNorm`` with the same weights (``nn.Parameter``s in x's dtype), as a model
  calls them: a forward under ``torch.no_grad()`` (inference), and a forward on an input
  that requires grad followed by ``y.backward(dy)`` into the parameters' ``.grad``
  (training; grads reset to None before each call on both sides). No torch.compile peer.
* backend-direct ("kernel fwd", "kernel fwd+bwd"): ``numba_cpu.forward`` against
  F.group_norm; our forward + backward_reduce + the small (N, C) torch sums +
  backward_dx against ATen's native_group_norm + native_group_norm_backward. These leave
  out the op/autograd layers, so the gap between the two kinds is the Python glue.
  "kernel fused" is the same with ``numba_cpu.backward_fused`` (both backward stages in
  one call; the op layer does not use it yet).

Each row also counts minor page faults per call on both sides (after the timing): fresh
output pages cost a fault per 4 KiB, on a VM more than the kernel, and glibc decides per
call whether an output of a given size gets fresh pages (see numba_cpu.output_pool).

Two references sit beside ATen in every row, measured in the same run:

* the memory floor: what moving the least bytes the pass needs (FLOOR_PASSES tensors of
  x's size: a forward reads x and writes y) costs at the speed of ``dst.copy_(x)`` into a
  preallocated tensor of x's size and layout, timed just before the row's passes. Shown
  as "floor us" and as the fraction of it each side reaches (100% = as fast as a copy);
  a side above 100% ran faster than a copy could move those bytes (the data stayed in
  cache). It tells a slow kernel from a pass that no kernel could make much faster.
* torch.compile of F.group_norm (``compile_peer=True``; public-API rows), timed
  interleaved with the other two sides after one untimed call that compiles it.
"""
from __future__ import annotations

import sys
import time
from typing import Dict, Iterable, List

try:
    import resource
except ImportError:   # not on Windows: the fault columns read "-"
    resource = None

import torch
import torch.nn.functional as F

import groupnorm

from ..backends import numba_cpu
from .compile_peer import compiled
from .suite import Case
from .timing import time_interleaved

EPS = 1e-5
FORMATS = {"nchw": torch.contiguous_format, "nhwc": None}
# Bytes each pass must move at least, in units of x.numel() * element_size.
TENSOR_PASSES = {"fwd": 2, "bwd": 5, "fwd+bwd": 7,   # fwd: x, y | bwd: dy, x (reduce) +dy, x, dx
                 "module fwd": 2, "module fwd+bwd": 7, "kernel fwd": 2, "kernel fwd+bwd": 7, "kernel fused": 7}
# The least a pass must move, in the same units: every tensor once (a forward that keeps a
# group in cache between its statistics and its apply reads x once).
FLOOR_PASSES = {"fwd": 2, "bwd": 3, "fwd+bwd": 5, "module fwd": 2, "module fwd+bwd": 5, "kernel fwd": 2,
                "kernel fwd+bwd": 5, "kernel fused": 5}
API_PASSES = ("fwd", "bwd", "fwd+bwd")
MODULE_PASSES = ("module fwd", "module fwd+bwd")
KERNEL_PASSES = ("kernel fwd", "kernel fwd+bwd", "kernel fused")


def _input(shape, dtype, fmt, seed):
    g = torch.Generator().manual_seed(seed)
    x = (-2.3 + 0.5 * torch.randn(shape, generator=g)).to(dtype)
    if fmt == "nhwc":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)   # channels_last(_3d)
    return x


def _ours_fwd_bwd(x, w, b, dy, groups):
    n, c = x.shape[0], x.shape[1]
    y, mean, rstd = numba_cpu.forward(x, w, b, None, None, groups, EPS, "none")
    s1, s0 = numba_cpu.backward_reduce(dy, x, mean, rstd, w, b, None, None, groups, "none")
    wf = w.to(s1.dtype)
    g1 = (s0 * wf).view(n, groups, -1).sum(-1)
    g2 = (s1 * wf).view(n, groups, -1).sum(-1)
    dw, db = s1.sum(0), s0.sum(0)
    count = x.numel() // (n * groups)
    dx = numba_cpu.backward_dx(dy, x, mean, rstd, w, b, None, None, g1, g2, count, groups, "none")
    return y, dx, dw, db


def _ours_fused(x, w, b, dy, groups):
    y, mean, rstd = numba_cpu.forward(x, w, b, None, None, groups, EPS, "none")
    s1, s0, dx = numba_cpu.backward_fused(dy, x, mean, rstd, w, b, None, None, groups, "none")
    return y, dx, s1.sum(0), s0.sum(0)


def _aten_fwd_bwd(x, w, b, dy, groups):
    n, c = x.shape[0], x.shape[1]
    hw = x.numel() // (n * c)
    y, mean, rstd = torch.ops.aten.native_group_norm(x, w, b, n, c, hw, groups, EPS)
    dx, dw, db = torch.ops.aten.native_group_norm_backward(
        dy, x, mean, rstd, w, n, c, hw, groups, [True, True, True])
    return y, dx, dw, db


def _api_fwd(fn, x, w, b, groups):
    """A fresh graph: leaf copies of x, w, b requiring grad and fn's output on them."""
    leaves = tuple(t.detach().requires_grad_() for t in (x, w, b))
    return fn(leaves[0], groups, leaves[1], leaves[2], EPS), leaves


def _api_bwd(graph, dy):
    """The backward alone of a graph made by _api_fwd: (y, dx, dw, db)."""
    y, leaves = graph
    return (y,) + torch.autograd.grad(y, leaves, dy)


def _api_fwd_bwd(fn, x, w, b, dy, groups):
    return _api_bwd(_api_fwd(fn, x, w, b, groups), dy)


def _module_pair(w, b, groups):
    """(groupnorm.GroupNorm, torch.nn.GroupNorm) with weight w and bias b as Parameters."""
    pair = (groupnorm.GroupNorm(groups, w.shape[0], EPS), torch.nn.GroupNorm(groups, w.shape[0], EPS))
    for m in pair:
        m.weight = torch.nn.Parameter(w.clone())
        m.bias = torch.nn.Parameter(b.clone())
    return pair


def _module_fwd(m, x):
    with torch.no_grad():
        return m(x)


def _module_fwd_bwd(m, x, dy):
    """A training step's share: forward on an input that requires grad, backward into
    the parameters' .grad (reset first) -> (y, dx, dweight, dbias)."""
    m.weight.grad = m.bias.grad = None
    xl = x.detach().requires_grad_()
    y = m(xl)
    y.backward(dy)
    return y, xl.grad, m.weight.grad, m.bias.grad


def _first_call_check(ours, reference, x, w, b, dy, groups):
    """A row's untimed first call -> (seconds, max diff, layout kept): a forward's output
    (a tensor) against reference()'s, a training pass's (y, dx, dw, db) against float64
    autograd (see _grad_error)."""
    t0 = time.perf_counter()
    got = ours()
    first = time.perf_counter() - t0
    if isinstance(got, torch.Tensor):
        return first, (got.float() - reference().float()).abs().max().item(), got.stride() == x.stride()
    return first, _grad_error(got, x, w, b, dy, groups), got[1].stride() == x.stride()


def _grad_error(got, x, w, b, dy, groups) -> float:
    """Largest error of (dx, dw, db) against float64 autograd, relative to each's max.

    Compared with float64 rather than ATen: ATen's bfloat16 backward accumulates dweight
    and dbias in bfloat16, so it is the less accurate side of the two.
    """
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    F.group_norm(xd, groups, wd, bd, EPS).backward(dy.double())
    return max((g.double() - r).abs().max().item() / max(r.abs().max().item(), 1e-30)
               for g, r in zip(got[1:], (xd.grad, wd.grad, bd.grad)))


def faults_per_call(fn, calls: int = 5, setup=None) -> float:
    """Minor page faults per call of fn (fresh output pages being mapped), or NaN where
    the platform does not count them; with ``setup``, per ``fn(setup())``, counting fn's
    faults only. Reported beside the times: on a VM a run of faults can cost more than
    the kernel, on either side."""
    if resource is None:
        return float("nan")
    faults = 0
    for _ in range(calls):
        arg = setup() if setup is not None else None
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn() if setup is None else fn(arg)
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return faults / calls


def copy_time(x: torch.Tensor, budget_s: float, warmup: int = 3, min_runs: int = 10):
    """Timing of ``dst.copy_(x)`` (read x, write a tensor of its size and layout, no fresh
    pages): the unit of the memory floor."""
    dst = torch.empty_like(x)
    (timing,) = time_interleaved([lambda: dst.copy_(x)], warmup=warmup, min_runs=min_runs, budget_s=budget_s)
    return timing


def _compile_peer(p, x, w, b, dy, groups):
    """(call, setup) of torch.compile'd F.group_norm for an API pass, compiled by one
    untimed call here; (None, None) where compiling fails (no C++ compiler, ...)."""
    fn = compiled(F.group_norm)
    try:
        if p == "fwd":
            call, setup = (lambda: fn(x, groups, w, b, EPS)), None
            call()
        elif p == "bwd":
            call, setup = (lambda graph: _api_bwd(graph, dy)), (lambda: _api_fwd(fn, x, w, b, groups))
            call(setup())
        else:
            call, setup = (lambda: _api_fwd_bwd(fn, x, w, b, dy, groups)), None
            call()
    except Exception as exc:   # a missing compiler must not lose the other columns
        print(f"torch.compile peer failed ({type(exc).__name__}: {str(exc)[:160]}); column left empty",
              file=sys.stderr)
        return None, None
    return call, setup


def prepare_compile_peers(case: Case, dtype: torch.dtype, fmt: str, passes=("fwd", "fwd+bwd")) -> bool:
    """Compile the torch.compile peers of a row ahead of its timing (the main job overlaps
    this with Numba compiles in a second process); later calls on inputs of the same shape,
    dtype, layout and grad mode reuse the graphs. False where compiling failed."""
    x = _input(case.shape, dtype, fmt, 0)
    w = torch.ones(case.shape[1], dtype=dtype)
    ok = True
    for p in passes:
        ok &= _compile_peer(p, x, w, w, torch.ones_like(x), case.num_groups)[0] is not None
    return ok


def run_cpu_benchmark(cases: Iterable[Case], dtypes=(torch.float32, torch.bfloat16),
                      formats=("nchw", "nhwc"), passes=API_PASSES + MODULE_PASSES + KERNEL_PASSES,
                      budget_s: float = 0.3, compile_peer: bool = False, faults: bool = True,
                      on_row=None) -> List[Dict]:
    """One row per (case, dtype, format, pass): correctness, then ours vs ATen (and, with
    compile_peer, torch.compile) timings, and the memory floor of the pass. Kernels compile
    on a row's first (untimed) call, shown in its "first call ms"; ``faults=False`` leaves
    out the page-fault count (NaN); ``on_row(row)`` hears of each row as it is measured."""
    rows = []
    for case in cases:
        for dtype in dtypes:
            for fmt in formats:
                x = _input(case.shape, dtype, fmt, 0)
                dy = _input(case.shape, dtype, fmt, 1)
                c = case.shape[1]
                w = (1 + 0.1 * torch.randn(c)).to(dtype)
                b = (0.1 * torch.randn(c)).to(dtype)
                big = x.numel() >= 8 * 2**20
                counts = dict(warmup=1 if big else 3, min_runs=5 if big else 10)   # every timing of this x
                copy_us = copy_time(x, 2 * budget_s, **counts).median_us
                for p in passes:
                    setups = None
                    if p in API_PASSES:
                        fn = groupnorm.group_norm
                        if p == "fwd":
                            ours = lambda: fn(x, case.num_groups, w, b, EPS)
                            aten = lambda: F.group_norm(x, case.num_groups, w, b, EPS)
                        else:
                            ours = lambda: _api_fwd_bwd(fn, x, w, b, dy, case.num_groups)
                            aten = lambda: _api_fwd_bwd(F.group_norm, x, w, b, dy, case.num_groups)
                        first, diff, layout_ok = _first_call_check(ours, aten, x, w, b, dy, case.num_groups)
                        if p == "bwd":   # time the backward alone; forward untimed per call
                            setups = [lambda: _api_fwd(fn, x, w, b, case.num_groups),
                                      lambda: _api_fwd(F.group_norm, x, w, b, case.num_groups)]
                            ours = aten = lambda graph: _api_bwd(graph, dy)
                    elif p in MODULE_PASSES:
                        mine, theirs = _module_pair(w, b, case.num_groups)
                        if p == "module fwd":
                            ours, aten = (lambda: _module_fwd(mine, x)), (lambda: _module_fwd(theirs, x))
                        else:
                            ours = lambda: _module_fwd_bwd(mine, x, dy)
                            aten = lambda: _module_fwd_bwd(theirs, x, dy)
                        first, diff, layout_ok = _first_call_check(ours, aten, x, w, b, dy, case.num_groups)
                    elif p == "kernel fwd":
                        ours = lambda: numba_cpu.forward(x, w, b, None, None, case.num_groups, EPS, "none")
                        aten = lambda: F.group_norm(x, case.num_groups, w, b, EPS)
                        first, diff, layout_ok = _first_call_check(lambda: ours()[0], aten, x, w, b, dy,
                                                                   case.num_groups)
                    else:
                        fused = p == "kernel fused"
                        ours = lambda: (_ours_fused if fused else _ours_fwd_bwd)(x, w, b, dy, case.num_groups)
                        aten = lambda: _aten_fwd_bwd(x, w, b, dy, case.num_groups)
                        first, diff, layout_ok = _first_call_check(ours, aten, x, w, b, dy, case.num_groups)
                    sides = [ours, aten]
                    if compile_peer and p in API_PASSES:
                        peer, peer_setup = _compile_peer(p, x, w, b, dy, case.num_groups)
                        if peer is not None:
                            sides.append(peer)
                            if setups:   # "bwd": each side's call gets its own fresh graph
                                setups = setups + [peer_setup]
                    timings = time_interleaved(sides, setups=setups, budget_s=len(sides) * budget_s, **counts)
                    t_ours, t_aten = timings[:2]
                    compile_us = timings[2].median_us if len(timings) > 2 else None
                    calls = 2 if big else 5
                    fault_counts = ((faults_per_call(ours, calls, setups and setups[0]),
                                     faults_per_call(aten, calls, setups and setups[1]))
                                    if faults else (float("nan"), float("nan")))
                    moved = TENSOR_PASSES[p] * x.numel() * x.element_size()
                    floor_us = FLOOR_PASSES[p] / 2 * copy_us
                    rows.append(dict(
                        case=case.name, dtype=str(dtype).replace("torch.", ""), format=fmt, pass_=p,
                        ours_us=t_ours.median_us, aten_us=t_aten.median_us,
                        speedup=t_aten.median_s / t_ours.median_s,
                        gbps=moved / t_ours.median_s / 1e9, max_diff=diff, layout_ok=layout_ok,
                        first_call_ms=first * 1e3,
                        faults_ours=fault_counts[0], faults_aten=fault_counts[1], compile_us=compile_us,
                        vs_compile=None if compile_us is None else compile_us / t_ours.median_us,
                        copy_us=copy_us, floor_us=floor_us, floor_ours=floor_us / t_ours.median_us,
                        floor_aten=floor_us / t_aten.median_us))
                    if on_row is not None:
                        on_row(rows[-1])
    return rows


def format_table(rows: List[Dict]) -> str:
    """Markdown: case | dtype | format | pass | ours us | ATen us | speed-up | GB/s ours | ..."""
    lines = []
    lines.append("| case | dtype | format | pass | ours us | ATen us | speed-up | compile us | vs compile "
                 "| floor us | of floor ours, ATen | GB/s ours | max diff | first call ms "
                 "| page faults/call ours, ATen |")
    lines.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        peer = r.get("compile_us")
        compile_cells = "- | -" if peer is None else f"{peer:.0f} | {r['vs_compile']:.2f}x"
        lines.append(f"| {r['case']} | {r['dtype']} | {r['format']} | {r['pass_']} | "
                     f"{r['ours_us']:.0f} | {r['aten_us']:.0f} | {r['speedup']:.2f}x | {compile_cells} | "
                     f"{r['floor_us']:.0f} | {100 * r['floor_ours']:.0f}%, {100 * r['floor_aten']:.0f}% | "
                     f"{r['gbps']:.1f} | {r['max_diff']:.1e} | {r['first_call_ms']:.1f} | "
                     f"{r['faults_ours']:.0f}, {r['faults_aten']:.0f} |")
    return "\n".join(lines)


def geomean(values) -> float:
    values = list(values)
    prod = 1.0
    for v in values:
        prod *= v
    return prod ** (1.0 / max(len(values), 1))


def summary(rows: List[Dict]) -> str:
    """Geometric-mean speed-ups per (pass, format): the public-API rows ("fwd", "bwd", "fwd+bwd")
    are the numbers the targets are stated in. Where some rows had page faults on either
    side, also the geomean of the rest: the kernels and glue alone, without allocator luck."""
    out = []
    order = API_PASSES + MODULE_PASSES + KERNEL_PASSES
    for p in sorted({r["pass_"] for r in rows}, key=lambda q: order.index(q) if q in order else 99):
        for fmt in sorted({r["format"] for r in rows}):
            sel = [r["speedup"] for r in rows if r["pass_"] == p and r["format"] == fmt]
            if sel:
                out.append(f"- {p} {fmt}: geomean {geomean(sel):.2f}x, min {min(sel):.2f}x")
        sel = [r["speedup"] for r in rows if r["pass_"] == p]
        out.append(f"- {p} all: geomean {geomean(sel):.2f}x, min {min(sel):.2f}x")
        quiet = [r["speedup"] for r in rows if r["pass_"] == p
                 and r.get("faults_ours", 0) == 0 and r.get("faults_aten", 0) == 0]
        if quiet and len(quiet) < len(sel):
            out.append(f"- {p}, only rows where neither side page-faulted ({len(quiet)} of {len(sel)}): "
                       f"geomean {geomean(quiet):.2f}x, min {min(quiet):.2f}x")
        peer = [r["vs_compile"] for r in rows if r["pass_"] == p and r.get("vs_compile") is not None]
        if peer:
            out.append(f"- {p} vs torch.compile ({len(peer)} rows): geomean {geomean(peer):.2f}x, "
                       f"min {min(peer):.2f}x")
        floor = [(r["floor_ours"], r["floor_aten"]) for r in rows if r["pass_"] == p]
        if floor:
            out.append(f"- {p} share of the memory floor (geomean): ours {100 * geomean(f[0] for f in floor):.0f}%, "
                       f"ATen {100 * geomean(f[1] for f in floor):.0f}%")
    return "\n".join(out)
