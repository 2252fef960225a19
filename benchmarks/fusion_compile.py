"""diffusers' ResnetBlock2D ("scale_shift" time embedding) on the CPU: stock, converted without
fusion, converted with fusion; eager and torch.compile (Inductor), with and without the
compile pass of ``groupnorm.compile_fusion``.

    python benchmarks/fusion_compile.py [--shape 2,64,32,32] [--budget 2.0] [--train] [--threads N]
                                        [--part norm]

``--part norm`` times only the part the fusion touches (GroupNorm -> * (1 + scale) + shift ->
SiLU, as a module written like the block's forward), where the convolutions do not hide it.

Why: the question of docs/fusion.md is whether a converted model is ever slower than the
stock one, eager or compiled. All variants share the parameters; their outputs are checked
against the stock block's; timings alternate between variants in rounds. On a loaded shared
machine wall time mostly measures the scheduler: with ``--threads 1`` the process CPU time
of each call (median) and the fastest wall time are reported instead.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

if "--threads" in sys.argv:   # before torch and Numba start their thread pools
    _threads = sys.argv[sys.argv.index("--threads") + 1]
    os.environ["NUMBA_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = _threads

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

import groupnorm  # noqa: E402
from groupnorm import compile_fusion  # noqa: E402
from groupnorm.bench.timing import time_interleaved  # noqa: E402


class NormPart(nn.Module):
    """norm2 -> time scale/shift -> SiLU of ResnetBlock2D("scale_shift"), in forward code."""

    def __init__(self, c, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.act = nn.SiLU()

    def forward(self, x, temb):
        scale, shift = temb[:, :, None, None].chunk(2, dim=1)
        return self.act(self.norm(x) * (1 + scale) + shift)


class FusedNormPart(NormPart):
    """The same as one fused call (what convert's adapters do for diffusers' blocks)."""

    def forward(self, x, temb):
        scale, shift = temb.chunk(2, dim=1)
        return groupnorm.group_norm(x, self.norm.num_groups, self.norm.weight, self.norm.bias,
                                    self.norm.eps, activation="silu", scale=scale, shift=shift)


def _variants(n, c, groups, part):
    torch.manual_seed(0)
    if part == "norm":
        stock = NormPart(c, groups)
        fused = FusedNormPart(c, groups)
        fused.load_state_dict(stock.state_dict())
        swapped = groupnorm.convert(copy.deepcopy(stock))
        return _compiled(stock, swapped, fused)
    stock = ResnetBlock2D(in_channels=c, temb_channels=c, groups=groups, time_embedding_norm="scale_shift")
    swapped = groupnorm.convert(copy.deepcopy(stock))
    fused = groupnorm.convert(copy.deepcopy(stock), fuse=True)
    return _compiled(stock, swapped, fused)


def _compiled(stock, swapped, fused):
    with_pass = compile_fusion.options()
    return {
        "stock eager": stock,
        "converted eager": swapped,
        "converted fuse=True eager": fused,
        "stock compiled": torch.compile(stock),
        "converted compiled": torch.compile(copy.deepcopy(swapped)),
        "converted compiled + pass": torch.compile(copy.deepcopy(swapped), options=with_pass),
        "converted fuse=True compiled": torch.compile(copy.deepcopy(fused)),
        "converted fuse=True compiled + pass": torch.compile(copy.deepcopy(fused), options=with_pass),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="2,64,32,32")
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--budget", type=float, default=2.0)
    parser.add_argument("--train", action="store_true", help="time forward + backward")
    parser.add_argument("--threads", type=int, default=None, help="torch and Numba threads")
    parser.add_argument("--part", choices=["block", "norm"], default="block")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, c, h, w = (int(v) for v in args.shape.split(","))
    variants = _variants(n, c, args.groups, args.part)
    x = torch.randn(n, c, h, w, requires_grad=args.train)
    temb = torch.randn(n, 2 * c if args.part == "norm" else c)
    with torch.no_grad():
        expected = variants["stock eager"](x, temb)

    def call(model):
        if args.train:
            def run():
                model(x, temb).sum().backward()
        else:
            def run():
                with torch.no_grad():
                    model(x, temb)
        return run

    for name, model in variants.items():   # compiles here, and checks every variant
        with torch.no_grad():
            torch.testing.assert_close(model(x, temb), expected, rtol=1e-4, atol=1e-4, msg=name)
        call(model)()
    fns = [call(m) for m in variants.values()]
    title = (f"{'ResnetBlock2D' if args.part == 'block' else 'GroupNorm -> scale/shift -> SiLU'}, x {tuple(x.shape)}, {args.groups} groups, "
             f"{'forward+backward' if args.train else 'forward (no_grad)'}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads")
    names = list(variants)
    base = names.index("stock compiled")
    if args.threads == 1:
        cpu, wall = _cpu_times(fns, args.budget)
        print(title + ": median process CPU time per call, fastest wall time")
        for name, c_us, w_us in zip(names, cpu, wall):
            print(f"  {name:36s} cpu {c_us:8.0f} us  wall min {w_us:8.0f} us  {cpu[base] / c_us:5.2f}x vs stock compiled")
        return
    timings = time_interleaved(fns, budget_s=args.budget * len(variants))
    print(title)
    for name, t in zip(names, timings):
        print(f"  {name:36s} {t.median_us:10.0f} us  (p20 {t.p20_s * 1e6:.0f}, p80 {t.p80_s * 1e6:.0f})"
              f"  {timings[base].median_us / t.median_us:5.2f}x vs stock compiled")


def _cpu_times(fns, budget_s, rounds=10):
    """Per function: median CPU time and minimum wall time of a call, in alternating rounds."""
    cpu = [[] for _ in fns]
    wall = [[] for _ in fns]
    for _ in range(rounds):
        for fn, c, w in zip(fns, cpu, wall):
            end = time.perf_counter() + budget_s / rounds
            while time.perf_counter() < end or len(c) < 3:
                c0, w0 = time.process_time(), time.perf_counter()
                fn()
                w.append(time.perf_counter() - w0)
                c.append(time.process_time() - c0)
    return [statistics.median(c) * 1e6 for c in cpu], [min(w) * 1e6 for w in wall]


if __name__ == "__main__":
    main()
