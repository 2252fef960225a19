"""Real models end to end: diffusers' AutoencoderKL (the Stable Diffusion VAE configuration)
decoding a latent, and a UNet2DConditionModel in a small SD-like configuration (forward and
training step), each as shipped ("stock"), after ``groupnorm.convert(model)`` and after
``convert(model, fuse=True)``, in eager mode and under ``torch.compile``.

Weights are random (nothing is downloaded); every variant is a copy of the same stock model,
so outputs are compared directly. The share of a step spent in GroupNorm is read from the
torch profiler in eager mode: the forward of every GroupNorm module (marked by hooks) and
the autograd nodes of their backward, over the whole step. Under torch.compile the norms
are fused into the generated code and have no time of their own.

    python -m groupnorm --models            # with the main job
    python -m groupnorm.bench.models        # alone
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .compile_peer import lift_recompile_limits
from .timing import time_fn, time_interleaved

VARIANTS = ("stock", "convert", "convert+fuse")


@dataclass
class ModelCase:
    name: str
    make: Callable[[], torch.nn.Module]          # the stock model, random weights
    inputs: Callable[[torch.device, torch.dtype], tuple]
    run: Callable                                # run(model, *inputs) -> output tensor
    train: bool                                  # also time a training step


def sd_vae(tiny: bool = False) -> torch.nn.Module:
    """AutoencoderKL with Stable Diffusion's VAE configuration (``tiny``: the same blocks,
    narrower, for tests)."""
    from diffusers import AutoencoderKL

    widths = (32, 32, 64, 64) if tiny else (128, 256, 512, 512)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=widths,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1 if tiny else 2, norm_num_groups=8 if tiny else 32)


def small_unet(tiny: bool = False) -> torch.nn.Module:
    """UNet2DConditionModel shaped like SD's (cross-attention down/up blocks, a mid block,
    32 groups), narrower and shallower so a CPU step takes a fraction of a second."""
    from diffusers import UNet2DConditionModel

    widths = (32, 64) if tiny else (64, 128, 256)
    down = ("CrossAttnDownBlock2D",) * (len(widths) - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(widths) - 1)
    return UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, block_out_channels=widths,
                                down_block_types=down, up_block_types=up, layers_per_block=1,
                                cross_attention_dim=32 if tiny else 128, attention_head_dim=8,
                                norm_num_groups=8 if tiny else 32)


def model_cases(device: str, tiny: bool = False) -> List[ModelCase]:
    """The VAE decodes a 64x64 latent (a 512x512 image) on a GPU and an 8x8 one on a CPU
    (4x4 tiny); the UNet takes a 32x32 latent on a GPU, 16x16 on a CPU (8x8 tiny), and 8
    text tokens."""
    gpu = torch.device(device).type == "cuda"
    side = 4 if tiny else (64 if gpu else 8)
    unet_side = 8 if tiny else (32 if gpu else 16)
    context = 32 if tiny else 128

    def vae_inputs(dev, dtype):
        return (torch.randn(1, 4, side, side, device=dev, dtype=dtype),)

    def unet_inputs(dev, dtype):
        return (torch.randn(1, 4, unet_side, unet_side, device=dev, dtype=dtype),
                torch.tensor([500], device=dev), torch.randn(1, 8, context, device=dev, dtype=dtype))

    return [
        ModelCase(f"SD VAE decode {side}x{side} latent", lambda: sd_vae(tiny), vae_inputs,
                  lambda m, z: m.decode(z).sample, train=False),
        ModelCase(f"small SD UNet {unet_side}x{unet_side}", lambda: small_unet(tiny), unet_inputs,
                  lambda m, x, t, c: m(x, t, c).sample, train=True),
    ]


def variants(stock: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """The stock model and two converted copies of it (same weights)."""
    import groupnorm

    return {"stock": stock, "convert": groupnorm.convert(copy.deepcopy(stock)),
            "convert+fuse": groupnorm.convert(copy.deepcopy(stock), fuse=True)}


def _step(case: ModelCase, model, inputs, train: bool):
    """A forward (no grad), or a training step: forward, mean-square loss, backward."""
    if not train:
        with torch.no_grad():
            return case.run(model, *inputs)
    for p in model.parameters():
        p.grad = None
    out = case.run(model, *inputs)
    out.float().square().mean().backward()
    return out


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def compare(case: ModelCase, models: Dict[str, torch.nn.Module], inputs, train: bool) -> Dict[str, float]:
    """Largest difference of each variant's output (and, for a training step, of its
    parameter gradients) from the stock model's, relative to the stock's largest value."""
    ref = _step(case, models["stock"], inputs, train).detach()
    ref_grads = _grads(models["stock"]) if train else None
    diffs = {}
    for name, model in models.items():
        if name == "stock":
            continue
        out = _step(case, model, inputs, train).detach()
        diffs[name] = _rel_diff(out, ref)
        if train:
            diffs[name] = max(diffs[name], _rel_diff(_grads(model), ref_grads))
    return diffs


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.GroupNorm)


def groupnorm_share(case: ModelCase, model, inputs, train: bool) -> float:
    """Share of an eager step's time spent in GroupNorm, forward and backward (see ``shares``)."""
    return sum(shares(case, model, inputs, train))


def shares(case: ModelCase, model, inputs, train: bool):
    """(forward, backward) shares of an eager step's time spent in GroupNorm, from the torch
    profiler: forward marked around every GroupNorm module, backward by the autograd nodes
    their outputs hang on (torch's NativeGroupNormBackward0, ours by their own names)."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    open_marks = []
    backward_nodes = set()   # the autograd nodes the norms' outputs hang on, whatever their class

    def enter(*_):
        open_marks.append(record_function("groupnorm module").__enter__())

    def leave(module, args, out):
        open_marks.pop().__exit__(None, None, None)
        if getattr(out, "grad_fn", None) is not None:
            backward_nodes.add(f"autograd::engine::evaluate_function: {out.grad_fn.name()}")

    hooks = []
    for m in model.modules():
        if _is_norm(m):
            hooks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    on_gpu = next(model.parameters()).is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    try:
        _step(case, model, inputs, train)      # untimed: first calls
        with profile(activities=activities) as prof:
            with record_function("model step"):
                _step(case, model, inputs, train)
                if on_gpu:
                    torch.cuda.synchronize()
    finally:
        for h in hooks:
            h.remove()
    cuda = ProfilerActivity.CUDA in activities

    def time_of(e):   # on a GPU, the device time of the kernels launched inside the range
        return e.device_time_total if cuda else e.cpu_time_total

    events = prof.events()
    total = sum(time_of(e) for e in events if e.name == "model step") or float("nan")
    forward = sum(time_of(e) for e in events if e.name == "groupnorm module")
    backward = sum(time_of(e) for e in events if e.name in backward_nodes)
    return forward / total, backward / total


def _quietly(fn, *args):
    """fn(*args) with diffusers' warnings off (``.to(float16)`` on a model warns that
    ``from_pretrained`` would keep some modules in float32: none here)."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return fn(*args)
    finally:
        logging.set_verbosity(level)


@dataclass
class ModelRow:
    model: str
    pass_: str
    mode: str
    ms: Dict[str, float] = field(default_factory=dict)
    diff: Dict[str, float] = field(default_factory=dict)
    share: Dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None


def measure(case: ModelCase, device: str, dtype: torch.dtype, train: bool, mode: str,
            budget_s: float = 2.0, say=None, rounds: int = 3) -> ModelRow:
    """One row: the three variants timed side by side (interleaved on a CPU, CUDA events
    on a GPU), their outputs compared with the stock model's, and (eager) the GroupNorm share."""
    torch.manual_seed(0)
    stock = case.make().to(device).train(train)
    if dtype != torch.float32:
        stock = _quietly(stock.to, dtype)
    models = variants(stock)
    inputs = case.inputs(torch.device(device), dtype)
    row = ModelRow(case.name, "training step" if train else "forward", mode)
    if mode == "compile":
        lift_recompile_limits()
        models = {k: torch.compile(m, dynamic=False) for k, m in models.items()}
    try:
        for name, model in models.items():   # first calls: compiles, untimed
            if say is not None and mode == "compile":
                say(f"{case.name}: torch.compile of the {name} model ...")
            _step(case, model, inputs, train)
        row.diff = compare(case, models, inputs, train)
        calls = [lambda m=m: _step(case, m, inputs, train) for m in models.values()]
        if torch.device(device).type == "cuda":
            timings = [time_fn(c, device, warmup=2, min_runs=5, max_runs=50, budget_s=budget_s / 3) for c in calls]
        else:
            timings = time_interleaved(calls, rounds=rounds, warmup=1, min_runs=rounds, max_runs=30,
                                       budget_s=budget_s)
        row.ms = {name: t.median_s * 1e3 for name, t in zip(models, timings)}
        if mode == "eager":
            row.share = {name: groupnorm_share(case, m, inputs, train) for name, m in models.items()}
    except Exception as exc:   # a model the converter or the compiler cannot take must not lose the rest
        row.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    return row


HEADER = ("| model | pass | mode | stock ms | convert ms | speed-up | convert+fuse ms | speed-up "
          "| max rel diff convert, fuse | GroupNorm share stock, convert, fuse |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|")


def format_row(r: ModelRow) -> str:
    if r.error:
        return f"| {r.model} | {r.pass_} | {r.mode} | failed: {r.error} |"
    s, c, f = (r.ms.get(k) for k in VARIANTS)
    share = ", ".join(f"{100 * r.share[k]:.0f}%" for k in VARIANTS) if r.share else "-"
    return (f"| {r.model} | {r.pass_} | {r.mode} | {s:.1f} | {c:.1f} | {s / c:.2f}x | {f:.1f} | {s / f:.2f}x | "
            f"{r.diff['convert']:.1e}, {r.diff['convert+fuse']:.1e} | {share} |")


def run(device: str = "cpu", compile_peer: bool = True, tiny: bool = False, budget_s: float = 2.0,
        say=None) -> List[ModelRow]:
    """Every model case, pass and mode, printing each row as it is measured."""
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    print(f"\nmodels end to end on {device} ({str(dtype)[6:]}, random weights): stock vs groupnorm.convert "
          f"vs convert(fuse=True); speed-up = stock time / ours", flush=True)
    print(HEADER, flush=True)
    rows = []
    for case in model_cases(device, tiny):
        for train in (False, True) if case.train else (False,):
            for mode in ("eager", "compile") if compile_peer else ("eager",):
                if say is not None:
                    say(f"{case.name}, {'training step' if train else 'forward'}, {mode} ...")
                rows.append(measure(case, device, dtype, train, mode, budget_s, say))
                print(format_row(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    run("cuda" if torch.cuda.is_available() else "cpu", compile_peer="--no-compile" not in sys.argv,
        tiny="--tiny" in sys.argv)
