"""Device checks and benchmarks of the one-pass kernels for large groups (issue 26).

    python benchmarks/gpu_large.py check    # barrier kernel vs the barrier-free pair (bit for bit),
                                            # vs float64, bitwise repeat, streamed plans, CUDA graph
    python benchmarks/gpu_large.py bench    # large suite vs copy bandwidth, torch eager, torch.compile
    python benchmarks/gpu_large.py tune     # tile / residency / span knobs on two shapes, registers
    python benchmarks/gpu_large.py ncu-target   # one forward, for `ncu` (the device script runs it)

Rows are printed as they are measured (a time-boxed run keeps what it got). Tensors past
2^31 elements: the slow tests in tests/test_triton_large.py (channels-last) and
tests/test_large.py (NCHW), run by the device script's `large` mode.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from groupnorm import grad_terms, reference  # noqa: E402
from groupnorm.backends.triton_gpu import onepass_launch, onepass_plan  # noqa: E402
import groupnorm.backends.triton_gpu as tg  # noqa: E402

DEV = "cuda"
EPS = 1e-5
TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 5e-5}

# Large suite (forward reads x, writes y): SD / SDXL VAE decoder, a video VAE, 256x1024x1024.
LARGE = [
    ("sd-vae-dec 512x128x128", (1, 512, 128, 128)),
    ("sd-vae-dec 512x256x256", (1, 512, 256, 256)),
    ("sd-vae-dec 256x512x512", (1, 256, 512, 512)),
    ("sd-vae-dec 128x512x512", (1, 128, 512, 512)),
    ("sdxl-vae-dec 512x512x512", (1, 512, 512, 512)),
    ("sdxl-vae-dec 128x1024x1024", (1, 128, 1024, 1024)),
    ("256x1024x1024", (1, 256, 1024, 1024)),
    ("video-vae 128x17x128x128", (1, 128, 17, 128, 128)),
]


class CoopCounter:
    """Counts cooperative (barrier) launches and keeps the last compiled kernel's registers."""

    def __init__(self):
        self.launches = 0
        self.last = None
        self._orig = onepass_launch.launch_cooperative

    def __enter__(self):
        def counted(kernel, grid, args, kwargs):
            out = self._orig(kernel, grid, args, kwargs)
            self.launches += 1
            self.last = out
            return out
        onepass_launch.launch_cooperative = counted
        return self

    def __exit__(self, *exc):
        onepass_launch.launch_cooperative = self._orig

    def regs(self):
        k = self.last
        return None if k is None else (getattr(k, "n_regs", None), getattr(k, "n_spills", None))


def _layout(t, cl):
    return t.to(memory_format=torch.channels_last) if cl and t.dim() == 4 else (
        t.movedim(1, -1).contiguous().movedim(-1, 1) if cl else t.contiguous())


def _inputs(shape, dtype, cl, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = _layout((torch.randn(shape, device=DEV, generator=g) * 0.5 - 2.3).to(dtype), cl)
    dy = _layout(torch.randn(shape, device=DEV, generator=g).to(dtype), cl)
    n, c = shape[:2]
    pdt = torch.float32
    w = 1 + 0.3 * torch.randn(c, device=DEV, generator=g)
    b = 0.2 * torch.randn(c, device=DEV, generator=g)
    sc = 0.3 * torch.randn(n, c, device=DEV, generator=g)
    sh = 0.3 * torch.randn(n, c, device=DEV, generator=g)
    return x, w.to(pdt), b.to(pdt), sc.to(pdt), sh.to(pdt), dy


def _all(args, groups, act):
    x, w, b, sc, sh, dy = args
    y, mean, rstd = tg.forward(x, w, b, sc, sh, groups, EPS, act)
    grads = tg.backward_grads(dy, x, mean, rstd, w, b, sc, sh, groups, act, True)
    return (y, mean, rstd) + tuple(grads)


def _ref(args, groups, act):
    x, w, b, sc, sh, dy = (t.double() for t in args)
    y, mean, rstd = reference.forward(x, w, b, sc, sh, groups, EPS, act)
    a, bs = reference.backward_reduce(dy, x, mean, rstd, w, b, sc, sh, groups, act)
    sdx, sdxx = grad_terms.group_sums(a, bs, w, sc, groups)
    count = x.numel() // (x.shape[0] * groups)
    dx = reference.backward_dx(dy, x, mean, rstd, w, b, sc, sh, sdx, sdxx, count, groups, act)
    return (y, mean, rstd, dx) + tuple(grad_terms.param_grads(a, bs, w, b, sc, sh))


def _rel_err(ours, ref):
    return ((ours.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def _with_mode(mode, fn):
    old = onepass_launch.MODE
    onepass_launch.MODE = mode
    try:
        return fn()
    finally:
        onepass_launch.MODE = old


CHECKS = [  # (shape, groups, dtype, channels_last, activation, knobs)
    ((2, 64, 96, 96), 8, torch.float16, False, "silu", {}),
    ((2, 64, 96, 96), 8, torch.bfloat16, True, "silu", {}),
    ((1, 320, 64, 64), 32, torch.float32, True, "gelu", {}),      # C/G = 10: masked spans
    ((3, 96, 60, 60), 32, torch.float32, False, "none", {}),      # C/G = 3
    ((1, 512, 128, 128), 32, torch.float16, True, "silu", {}),
    ((1, 512, 128, 128), 32, torch.float16, False, "silu", {}),
    ((1, 128, 256, 256), 32, torch.float16, True, "silu", {"TILE": 1024, "TILE_BWD": 512, "RESIDENT_PER_SM": 1}),
    ((1, 128, 256, 256), 32, torch.bfloat16, False, "mish", {"TILE": 1024, "TILE_BWD": 512, "RESIDENT_PER_SM": 1}),
    ((2, 64, 96, 96), 8, torch.float16, True, "silu", {"FORCE_WIDE": True}),
]
NAMES = ("y", "mean", "rstd", "dx", "dw", "db", "dscale", "dshift")


def check() -> bool:
    # Groups up to plan.GROUP_MAX_GROUP elements take the one-program-per-group path: the
    # check shapes below are chosen for the one-pass kernels, so route them all there.
    from groupnorm.backends.triton_gpu import plan

    saved_group_max, plan.GROUP_MAX_GROUP = plan.GROUP_MAX_GROUP, 0
    try:
        return _check_all()
    finally:
        plan.GROUP_MAX_GROUP = saved_group_max


def _check_all() -> bool:
    ok = True
    print("| shape | G | dtype | layout | act | knobs | plan fwd (split,k,waves,span) | coop launches | "
          "regs/spills | barrier == pair | repeat | max rel err vs f64 | pass |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, groups, dtype, cl, act, knobs in CHECKS:
        saved = {k: getattr(onepass_plan, k) for k in knobs}
        for k, v in knobs.items():
            setattr(onepass_plan, k, v)
        try:
            args = _inputs(shape, dtype, cl)
            x = args[0]
            n, c = shape[:2]
            hw = x.numel() // (n * c)
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            p = onepass_plan.onepass_plan(n, c, hw, groups, cl, x.element_size(), sms,
                                          torch.cuda.get_device_properties(0).L2_cache_size)
            with CoopCounter() as cc:
                a1 = _all(args, groups, act)
                a2 = _all(args, groups, act)
                torch.cuda.synchronize()
            pair = _with_mode("pair", lambda: _all(args, groups, act))
            split = _with_mode("off", lambda: _all(args, groups, act))
            ref = _ref(args, groups, act)
            same = all(torch.equal(u, v) for u, v in zip(a1, pair))
            repeat = all(torch.equal(u, v) for u, v in zip(a1, a2))
            errs = {nm: _rel_err(o, r) for nm, o, r in zip(NAMES, a1, ref)}
            errs_split = {nm: _rel_err(o, r) for nm, o, r in zip(NAMES, split, ref)}
            worst = max(errs, key=errs.get)
            tol = TOL[dtype]
            passed = (cc.launches == 4 and repeat and all(
                e <= max(tol, 2 * errs_split[k]) for k, e in errs.items()))
            ok &= passed
            print(f"| {'x'.join(map(str, shape))} | {groups} | {str(dtype)[6:]} | {'cl' if cl else 'nchw'} | {act} "
                  f"| {knobs or ''} | {p.split},{p.k},{p.waves},{p.span_g} | {cc.launches} | {cc.regs()} | {same} "
                  f"| {repeat} | {worst} {errs[worst]:.2e} (split path {errs_split[worst]:.2e}) | {passed} |",
                  flush=True)
        except Exception as exc:  # report and go on
            ok = False
            print(f"| {shape} | {groups} | {dtype} | {cl} | {act} | {knobs} | ERROR {type(exc).__name__}: "
                  f"{str(exc)[:300]} |", flush=True)
        finally:
            for k, v in saved.items():
                setattr(onepass_plan, k, v)
    ok &= graph_replay()
    print("refused cooperative plans:", len(onepass_launch._too_large))
    print("CHECK", "PASSED" if ok else "FAILED")
    return ok


def graph_replay() -> bool:
    """Forward + backward captured once, replayed on new inputs: same bits as eager calls."""
    ok = True
    for cl in (False, True):
        args = list(_inputs((2, 128, 64, 64), torch.float16, cl))
        groups = 32
        _all(args, groups, "silu")  # warm-up: compiles, barrier words for this stream
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with CoopCounter() as cc:
            with torch.cuda.graph(graph):
                outs = _all(args, groups, "silu")
        for seed in (1, 2, 3):
            fresh = _inputs((2, 128, 64, 64), torch.float16, cl, seed=seed)
            for dst, src in zip(args, fresh):
                dst.copy_(src)
            graph.replay()
            eager = _all(args, groups, "silu")
            torch.cuda.synchronize()
            same = all(torch.equal(u, v) for u, v in zip(outs, eager))
            ok &= same and cc.launches == 2
            print(f"graph replay {'cl' if cl else 'nchw'} seed {seed}: captured coop launches {cc.launches}, "
                  f"replay == eager: {same}", flush=True)
    return ok


def bench(dtypes, formats, use_compile_dtypes, cases) -> None:
    from groupnorm.bench.gpu import run_gpu_benchmark
    from groupnorm.bench.suite import Case

    with CoopCounter() as cc:
        for name, shape in cases:
            for dtype in dtypes:
                run_gpu_benchmark([Case(name, shape, 32)], dtypes=(dtype,), formats=formats,
                                  use_compile=dtype in use_compile_dtypes)
                print(f"<!-- {name} {dtype}: cooperative launches so far {cc.launches}, refused plans "
                      f"{len(onepass_launch._too_large)} -->", flush=True)


TUNE_SHAPES = [(1, 512, 256, 256), (1, 256, 1024, 1024)]


def tune() -> None:
    """Forward and fwd+bwd time of the barrier kernels under knob variants, with registers."""
    from groupnorm.bench.timing import time_fn

    variants = [dict(), dict(MIN_ROWS_PER_WAVE=1), dict(TILE=16384, TILE_BWD=8192),
                dict(TILE=16384, TILE_BWD=8192, RESIDENT_PER_SM=1), dict(TILE=4096, TILE_BWD=2048, RESIDENT_PER_SM=4),
                dict(SPAN_MIN_BYTES=1 << 30)]
    props = torch.cuda.get_device_properties(0)
    for shape in TUNE_SHAPES:
        for cl in (False, True):
            args = _inputs(shape, torch.float16, cl)
            x, w, b, _, _, dy = args
            nbytes = x.numel() * x.element_size()
            for var in variants:
                saved = {k: getattr(onepass_plan, k) for k in var}
                for k, v in var.items():
                    setattr(onepass_plan, k, v)
                onepass_launch._too_large.clear()
                try:
                    with CoopCounter() as cc:
                        f = time_fn(lambda: tg.forward(x, w, b, None, None, 32, EPS, "none"), DEV,
                                    warmup=2, min_runs=10, max_runs=50, budget_s=0.3)
                        fregs = cc.regs()
                        y, mean, rstd = tg.forward(x, w, b, None, None, 32, EPS, "none")
                        bw = time_fn(lambda: tg.backward_grads(dy, x, mean, rstd, w, b, None, None, 32, "none",
                                                               True), DEV, warmup=2, min_runs=10, max_runs=50,
                                     budget_s=0.3)
                        bregs = cc.regs()
                    n, c = shape[:2]
                    pf = onepass_plan.onepass_plan(n, c, x.numel() // (n * c), 32, cl, 2,
                                                   props.multi_processor_count, props.L2_cache_size)
                    print(f"| {'x'.join(map(str, shape))} | {'cl' if cl else 'nchw'} | {var or 'shipped'} | "
                          f"fwd plan k {pf.k} split {pf.split} waves {pf.waves} span {pf.span_g} | "
                          f"fwd {f.median_us:.1f} us ({2 * nbytes / f.median_s / 1e9:.0f} GB/s) regs {fregs} | "
                          f"bwd {bw.median_us:.1f} us ({3 * nbytes / bw.median_s / 1e9:.0f} GB/s) regs {bregs} | "
                          f"refused {len(onepass_launch._too_large)} |", flush=True)
                except Exception as exc:
                    print(f"| {shape} | {cl} | {var} | ERROR {type(exc).__name__}: {str(exc)[:200]} |", flush=True)
                finally:
                    for k, v in saved.items():
                        setattr(onepass_plan, k, v)


def ncu_target() -> None:
    x, w, b, _, _, _ = _inputs((1, 256, 1024, 1024), torch.float16, False)
    for _ in range(2):
        tg.forward(x, w, b, None, None, 32, EPS, "none")
    torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["check", "bench", "tune", "ncu-target"])
    ap.add_argument("--dtypes", default="float16,bfloat16,float32")
    ap.add_argument("--formats", default="nchw,channels_last")
    ap.add_argument("--compile-dtypes", default="float16")
    ap.add_argument("--cases", default="", help="comma list of substrings of case names")
    a = ap.parse_args(argv)
    print(torch.cuda.get_device_name(0), "torch", torch.__version__, "triton", __import__("triton").__version__,
          time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
          subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
          flush=True)
    if a.what == "check":
        return 0 if check() else 1
    if a.what == "bench":
        dts = [getattr(torch, d) for d in a.dtypes.split(",")]
        cases = [cs for cs in LARGE if not a.cases or any(s in cs[0] for s in a.cases.split(","))]
        bench(dts, a.formats.split(","), [getattr(torch, d) for d in a.compile_dtypes.split(",") if d], cases)
        return 0
    if a.what == "tune":
        tune()
        return 0
    ncu_target()
    return 0


if __name__ == "__main__":
    sys.exit(main())
