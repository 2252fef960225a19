"""The GPU suite for the everyday-shape targets: ours vs torch eager vs torch.compile, with
host microseconds per call beside GPU time, rows printed (and appended to the output
files) as they are measured, stopping cleanly at a deadline.

    python benchmarks/gpu_check.py --out $OUT/gpu_suite --deadline-s 320

Stage 1 (eager), every GPU suite shape x float16/bfloat16/float32 x NCHW/NHWC x forward,
forward+backward: ours (the public ``group_norm``: the lean call, direct launches), torch
eager, the measured copy bandwidth for x's size (ours as % of it; least bytes: forward
x + y, forward+backward x + y + dy + x + dx).
Stage 2 (compiled, float16 first, until --tune-s before the deadline): torch.compile of
F.group_norm and of ours, default and mode="reduce-overhead" (cudagraph_mark_step_begin
per call).
Stage 3 (knobs, the last --tune-s seconds): ours on three UNet shapes in float16 under
other plan.GROUP_BLOCK / plan.BACKWARD_TILE values (rows "knob"), the data for the next
choice of those constants.

Timing: CUDA events around a batch of back-to-back calls (what a model's loop sees:
max(host, GPU) per call), median of 5 batches; inputs rotate over enough copies that
the batch does not run from L2 (>= 128 MB of x) except under reduce-overhead, whose
graphs copy their inputs in anyway. Host us: wall time per call of the same batch
without waiting for the GPU.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

EPS = 1e-5
DEVICE = "cuda"   # --device cpu: a smoke run of this script's code where no GPU is lent
ROTATE_BYTES = 128 << 20
COLUMNS = ["stage", "knob", "case", "dtype", "format", "pass", "max_err", "launches", "copy_gbps", "ours_pct_copy",
           "ours_us", "torch_us", "x_torch", "ours_host_us", "torch_host_us",
           "torch_compile_us", "ours_compile_us", "x_compile", "torch_ro_us", "ours_ro_us", "x_ro",
           "liger_us", "error"]


def _git() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def _layout(t, fmt):
    return t.contiguous(memory_format=torch.channels_last) if fmt == "nhwc" and t.dim() == 4 else (
        t.movedim(1, -1).contiguous().movedim(-1, 1) if fmt == "nhwc" else t.contiguous())


class Inputs:
    """x (rotated copies), weight, bias in x's dtype, dy."""

    def __init__(self, case, dtype, fmt, grad):
        nbytes = math.prod(case.shape) * torch.finfo(dtype).bits // 8
        copies = max(1, min(8, math.ceil(ROTATE_BYTES / nbytes)))
        g = torch.Generator(device=DEVICE).manual_seed(0)
        base = torch.randn(case.shape, device=DEVICE, dtype=dtype, generator=g) * 0.5 - 2.3
        self.xs = [_layout(base.roll(i, dims=-1) if i else base, fmt).detach().clone().requires_grad_(grad)
                   for i in range(copies)]
        c = case.shape[1]
        self.w = (1 + 0.3 * torch.randn(c, device=DEVICE, generator=g)).to(dtype).requires_grad_(grad)
        self.b = (0.2 * torch.randn(c, device=DEVICE, generator=g)).to(dtype).requires_grad_(grad)
        self.dy = _layout(torch.randn(case.shape, device=DEVICE, dtype=dtype, generator=g), fmt)
        self.g = case.num_groups
        self.grad = grad
        self.i = 0

    def call(self, fn, rotate=True, mark_step=False):
        """A zero-argument callable running one forward (and backward) of fn."""
        def run():
            x = self.xs[self.i % len(self.xs)] if rotate else self.xs[0]
            self.i += 1
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            y = fn(x, self.g, self.w, self.b, EPS)
            if self.grad:
                torch.autograd.grad(y, (x, self.w, self.b), self.dy)
            return y
        return run


def _sync():
    if DEVICE == "cuda":
        _sync()


class _WallEvent:
    """torch.cuda.Event's interface on the host clock (the CPU smoke run)."""

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def _event():
    return torch.cuda.Event(enable_timing=True) if DEVICE == "cuda" else _WallEvent()


def _batch_size(fn) -> int:
    fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    _sync()
    per = (time.perf_counter() - t0) / 3
    return int(max(5, min(100, 2e-3 / max(per, 1e-7))))


def measure(fn):
    """(GPU us per call, host us per call) or (None, None) when fn fails."""
    try:
        k = _batch_size(fn)
        start, end = _event(), _event()
        gpu, host = [], []
        for _ in range(5):
            _sync()
            t0 = time.perf_counter()
            start.record()
            for _ in range(k):
                fn()
            end.record()
            host.append((time.perf_counter() - t0) / k * 1e6)
            end.synchronize()
            gpu.append(start.elapsed_time(end) / k * 1e3)
        gpu.sort()
        host.sort()
        return gpu[2], host[2]
    except Exception as exc:   # a failing peer leaves its cell empty
        print(f"  ({type(exc).__name__}: {str(exc)[:160]})", flush=True)
        return None, None


def copy_gbps(numel, dtype) -> float:
    src = torch.empty(numel, device=DEVICE, dtype=dtype).uniform_()
    dst = torch.empty_like(src)
    gpu, _ = measure(lambda: dst.copy_(src))
    return 2 * numel * src.element_size() / (gpu * 1e-6) / 1e9


def launches_per_call(fn):
    """Our kernel launches in one call (forward, or forward + backward)."""
    from groupnorm.backends.triton_gpu import launch

    before = launch.launch_count()
    fn()
    return launch.launch_count() - before


def _ratio(ours, peer):
    return None if not ours or not peer else peer / ours


def check(inputs, ours):
    """Max error of ours against torch in float32 (y, and dx for forward+backward)."""
    x = inputs.xs[0]
    xr = x.detach().float().requires_grad_(inputs.grad)
    ref = F.group_norm(xr, inputs.g, inputs.w.detach().float(), inputs.b.detach().float(), EPS)
    y = ours(x, inputs.g, inputs.w, inputs.b, EPS)
    err = (y.float() - ref).abs().max().item()
    if inputs.grad:
        dx = torch.autograd.grad(y, (x,), inputs.dy)[0]
        dxr = torch.autograd.grad(ref, (xr,), inputs.dy.float())[0]
        err = max(err, (dx.float() - dxr).abs().max().item() / max(1.0, dxr.abs().max().item()))
    return err


def _liger():
    try:
        from liger_kernel.ops.group_norm import LigerGroupNormFunction
    except Exception:
        return None
    return lambda x, g, w, b, eps: LigerGroupNormFunction.apply(x.contiguous(), w, b, x.shape[1], g, eps)


class Table:
    def __init__(self, out):
        self.out = out
        self.rows = 0
        for ext in (".csv", ".md"):
            if os.path.exists(out + ext):
                os.remove(out + ext)

    def add(self, row):
        cells = [row.get(c) for c in COLUMNS]
        text = ["" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v)) for v in cells]
        line = "| " + " | ".join(text) + " |"
        if self.rows == 0:
            head = "| " + " | ".join(COLUMNS) + " |\n|" + "|".join("---" for _ in COLUMNS) + "|"
            print(head, flush=True)
            with open(self.out + ".md", "a") as f:
                f.write(head + "\n")
        print(line, flush=True)
        with open(self.out + ".md", "a") as f:
            f.write(line + "\n")
        new = not os.path.exists(self.out + ".csv")
        with open(self.out + ".csv", "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(COLUMNS)
            writer.writerow(["" if v is None else v for v in cells])
        self.rows += 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_suite")
    parser.add_argument("--deadline-s", type=float, default=320.0)
    parser.add_argument("--dtypes", default="float16,bfloat16,float32")
    parser.add_argument("--formats", default="nchw,nhwc")
    parser.add_argument("--cases", default="", help="substring filter on case names")
    parser.add_argument("--compile-dtypes", default="float16,bfloat16,float32")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tune-s", type=float, default=45.0, help="seconds kept for the knob stage")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    stop_at = time.monotonic() + args.deadline_s

    import triton

    import groupnorm
    from groupnorm.bench.compile_peer import lift_recompile_limits
    from groupnorm.bench.suite import GPU_SUITE
    from groupnorm.backends.triton_gpu import direct

    ours = groupnorm.group_norm
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    head = (f"device: {name}  torch {torch.__version__}  triton {triton.__version__}  "
            f"direct launch: {direct.DIRECT}  git {_git()}  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(head, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    table = Table(args.out)
    with open(args.out + ".md", "a") as f:
        f.write(head + "\n\n")
    cases = [c for c in GPU_SUITE if args.cases in c.name]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",") if d]
    formats = [f for f in args.formats.split(",") if f]
    liger = _liger()
    copies = {}

    # Stage 1: eager.
    for dtype in dtypes:
        for fmt in formats:
            for case in cases:
                for pass_name in ("forward", "forward_backward"):
                    if time.monotonic() > stop_at:
                        print("deadline reached in the eager stage", flush=True)
                        return 0
                    row = dict(stage="eager", case=case.name, dtype=str(dtype)[6:], format=fmt, **{"pass": pass_name})
                    inputs = None
                    try:
                        inputs = Inputs(case, dtype, fmt, pass_name != "forward")
                        row["max_err"] = check(inputs, ours)
                        tol = 1e-4 if dtype == torch.float32 else 2e-2
                        if not math.isfinite(row["max_err"]) or row["max_err"] > tol * 8:
                            row["error"] = f"ours differs from torch by {row['max_err']:.3g}"
                        row["launches"] = launches_per_call(inputs.call(ours))
                        key = (math.prod(case.shape), dtype)
                        if key not in copies:
                            copies[key] = copy_gbps(*key)
                        row["copy_gbps"] = copies[key]
                        row["ours_us"], row["ours_host_us"] = measure(inputs.call(ours))
                        row["torch_us"], row["torch_host_us"] = measure(inputs.call(F.group_norm))
                        row["x_torch"] = _ratio(row["ours_us"], row["torch_us"])
                        moved = (2 if pass_name == "forward" else 5) * inputs.xs[0].numel() * inputs.xs[0].element_size()
                        if row["ours_us"]:
                            row["ours_pct_copy"] = 100 * moved / (row["ours_us"] * 1e-6) / 1e9 / row["copy_gbps"]
                        if liger is not None and fmt == "nchw":
                            row["liger_us"], _ = measure(inputs.call(liger))
                    except Exception as exc:
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                    table.add(row)
                    del inputs
                    if DEVICE == "cuda":
                        torch.cuda.empty_cache()

    # Stage 2: compiled, static shapes, default and reduce-overhead.
    compile_stop = stop_at - args.tune_s
    compiled_stage(args, cases, formats, ours, table, compile_stop, lift_recompile_limits)
    # Stage 3: the plan's knobs.
    knob_stage(formats, ours, table, stop_at)
    return 0


def compiled_stage(args, cases, formats, ours, table, stop_at, lift_recompile_limits):
    lift_recompile_limits()
    compile_dtypes = [getattr(torch, d) for d in args.compile_dtypes.split(",") if d]
    for dtype in compile_dtypes:
        for fmt in formats:
            for case in cases:
                for pass_name in ("forward", "forward_backward"):
                    if time.monotonic() > stop_at:
                        print("deadline reached in the compiled stage", flush=True)
                        return
                    row = dict(stage="compiled", case=case.name, dtype=str(dtype)[6:], format=fmt,
                               **{"pass": pass_name})
                    inputs = None
                    try:
                        inputs = Inputs(case, dtype, fmt, pass_name != "forward")
                        torch._dynamo.reset()
                        for name, fn, mode in (("torch_compile_us", F.group_norm, "default"),
                                               ("ours_compile_us", ours, "default"),
                                               ("torch_ro_us", F.group_norm, "reduce-overhead"),
                                               ("ours_ro_us", ours, "reduce-overhead")):
                            if time.monotonic() > stop_at:
                                break
                            compiled = torch.compile(fn, mode=mode, dynamic=False)
                            ro = mode == "reduce-overhead"
                            row[name], _ = measure(inputs.call(compiled, rotate=not ro, mark_step=ro))
                        row["x_compile"] = _ratio(row.get("ours_compile_us"), row.get("torch_compile_us"))
                        row["x_ro"] = _ratio(row.get("ours_ro_us"), row.get("torch_ro_us"))
                    except Exception as exc:
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                    table.add(row)
                    del inputs
                    if DEVICE == "cuda":
                        torch.cuda.empty_cache()


KNOB_CASES = ("sd15-unet b1 320x64x64", "sd15-unet b8 320x64x64", "sdxl-unet b8 1280x32x32")


def knob_stage(formats, ours, table, stop_at):
    """ours (float16) under other GROUP_BLOCK (forward) and BACKWARD_TILE (forward +
    backward) values; the defaults are restored after each row."""
    from groupnorm.backends.triton_gpu import plan
    from groupnorm.bench.suite import GPU_SUITE

    cases = [c for c in GPU_SUITE if c.name in KNOB_CASES]
    trials = [("forward", "GROUP_BLOCK", v) for v in (2048, 4096, 16384)]
    trials += [("forward_backward", "BACKWARD_TILE", v) for v in (2048, 8192)]
    for pass_name, knob, value in trials:
        for fmt in formats:
            for case in cases:
                if time.monotonic() > stop_at:
                    print("deadline reached in the knob stage", flush=True)
                    return
                row = dict(stage="knob", knob=f"{knob}={value}", case=case.name, dtype="float16", format=fmt,
                           **{"pass": pass_name})
                old = getattr(plan, knob)
                inputs = None
                try:
                    setattr(plan, knob, value)
                    inputs = Inputs(case, torch.float16, fmt, pass_name != "forward")
                    row["max_err"] = check(inputs, ours)
                    row["ours_us"], row["ours_host_us"] = measure(inputs.call(ours))
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                finally:
                    setattr(plan, knob, old)
                table.add(row)
                del inputs


if __name__ == "__main__":
    sys.exit(main())
