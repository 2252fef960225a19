"""Fused-epilogue benchmark rows (issue 6): one pass of ours against the unfused composition.

Peers: ATen ``F.group_norm`` followed by the separate ops a model runs (``* (1 + scale) +
shift``, ``F.silu``) in eager mode, and ``torch.compile`` of that same composition. Every
side runs through its public API, forward or forward + backward, on the same inputs.
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch
import torch.nn.functional as F

from ..functional import group_norm
from ..selfcheck import param_dtype_for
from .compile_peer import compiled as compile_peer_of
from .suite import Case
from .timing import time_fn, time_interleaved

# "<activation>" or "scale_shift+<activation>"
VARIANTS = ("silu", "scale_shift+silu")
ALL_VARIANTS = VARIANTS + ("gelu", "gelu_tanh", "mish")
_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "mish": F.mish,
}


def _activation_of(variant: str) -> str:
    return variant.split("+")[-1]


def _composition(x, groups, w, b, scale, shift, activation="silu"):
    z = F.group_norm(x, groups, w, b)
    if scale is not None:
        view = scale.shape + (1,) * (x.dim() - 2)
        z = z * (1 + scale.reshape(view)) + shift.reshape(view)
    return _ACTIVATIONS[activation](z)


def _fused(x, groups, w, b, scale, shift, activation="silu"):
    return group_norm(x, groups, w, b, activation=activation, scale=scale, shift=shift)


def _inputs(case: Case, dtype, device, variant, channels_last, requires_grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (-2.3 + 0.5 * torch.randn(case.shape, generator=g)).to(device=device, dtype=dtype)
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    c, n = case.shape[1], case.shape[0]
    pdtype = param_dtype_for(dtype, device)
    w = (1 + 0.3 * torch.randn(c, generator=g)).to(device=device, dtype=pdtype)
    b = (0.2 * torch.randn(c, generator=g)).to(device=device, dtype=pdtype)
    scale = shift = None
    if variant.startswith("scale_shift+"):
        scale = (0.2 * torch.randn(n, c, generator=g)).to(device=device, dtype=dtype)
        shift = (0.2 * torch.randn(n, c, generator=g)).to(device=device, dtype=dtype)
    tensors = [x, w, b, scale, shift]
    if requires_grad:
        tensors = [None if t is None else t.requires_grad_(True) for t in tensors]
    return tensors


def _runner(fn, tensors, groups, backward, dy, activation="silu"):
    x, w, b, scale, shift = tensors
    grads = [t for t in tensors if t is not None]

    def run():
        y = fn(x, groups, w, b, scale, shift, activation)
        if backward:
            torch.autograd.grad(y, grads, dy)
        return y
    return run


def run_fused_benchmark(cases: Iterable[Case], device="cpu", dtypes=(torch.float32,), variants=VARIANTS,
                        passes=("fwd", "fwd+bwd"), channels_last=False, compile_peer=True,
                        budget_s: float = 0.3, progress: bool = False) -> List[Dict]:
    """Rows of ours (fused) vs eager composition vs torch.compile'd composition.

    ``progress`` prints each row as it is measured, so a run cut off by a time box keeps them.
    """
    compiled = compile_peer_of(_composition) if compile_peer else None
    rows = []
    for case in cases:
        for dtype in dtypes:
            for variant in variants:
                for p in passes:
                    backward = p == "fwd+bwd"
                    tensors = _inputs(case, dtype, device, variant, channels_last, backward)
                    dy = torch.randn(case.shape, device=device).to(dtype) if backward else None
                    act = _activation_of(variant)
                    ours = _runner(_fused, tensors, case.num_groups, backward, dy, act)
                    eager = _runner(_composition, tensors, case.num_groups, backward, dy, act)
                    err = (ours().double() - eager().double()).abs().max().item()
                    row = {"case": case.name, "dtype": str(dtype).replace("torch.", ""), "variant": variant,
                           "pass": p, "max_diff": err}
                    sides = {"ours_us": ours, "eager_us": eager}
                    if compiled is not None:
                        peer = _runner(compiled, tensors, case.num_groups, backward, dy, act)
                        peer()  # compile outside the timed region
                        sides["compile_us"] = peer
                    if torch.device(device).type == "cpu":   # alternate the sides on a shared CPU
                        timings = time_interleaved(list(sides.values()), budget_s=budget_s * len(sides))
                    else:
                        timings = [time_fn(fn, device, budget_s=budget_s) for fn in sides.values()]
                    row.update({key: t.median_us for key, t in zip(sides, timings)})
                    rows.append(row)
                    if progress:
                        print(format_table([row]).splitlines()[-1], flush=True)
    return rows


def format_table(rows: List[Dict]) -> str:
    has_compile = any("compile_us" in r for r in rows)
    head = "| case | dtype | variant | pass | ours us | eager GN+ops us | vs eager |"
    sep = "|---|---|---|---|---:|---:|---:|"
    if has_compile:
        head += " compiled GN+ops us | vs compile |"
        sep += "---:|---:|"
    lines = [head + " max diff |", sep + "---:|"]
    for r in rows:
        line = (f"| {r['case']} | {r['dtype']} | {r['variant']} | {r['pass']} | {r['ours_us']:.0f} | "
                f"{r['eager_us']:.0f} | {r['eager_us'] / r['ours_us']:.2f}x |")
        if has_compile:
            line += f" {r['compile_us']:.0f} | {r['compile_us'] / r['ours_us']:.2f}x |"
        lines.append(line + f" {r['max_diff']:.1e} |")
    return "\n".join(lines)
