"""Correctness checks for the main job: ours vs torch vs float64 reference on this device."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from . import reference
from .backends import registry
from .bench.suite import Case
from .functional import group_norm

# Max |ours - ref64| may be at most this multiple of torch's own error (+ a dtype floor).
ERROR_FACTOR = 2.0
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _input(shape, dtype, device, channels_last):
    x = (-2.3 + 0.5 * torch.randn(shape, dtype=torch.float64, device=device)).to(dtype)
    return x.movedim(1, -1).contiguous().movedim(-1, 1) if channels_last else x


def param_dtype_for(dtype: torch.dtype, device) -> torch.dtype:
    """float32 parameters for half inputs where torch's peer accepts them (CPU); torch's CUDA
    kernel wants them in the input's dtype (it raises "expected scalar type")."""
    if dtype in (torch.float32, torch.float64) or torch.device(device).type == "cuda":
        return dtype
    return torch.float32


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def check_case(case: Case, dtype: torch.dtype, device: str, channels_last: bool) -> Dict:
    """Forward and backward of ours and torch against the float64 reference."""
    x = _input(case.shape, dtype, device, channels_last)
    c = case.shape[1]
    param_dtype = param_dtype_for(dtype, device)
    w = (1 + 0.3 * torch.randn(c, device=device)).to(param_dtype)
    b = (0.2 * torch.randn(c, device=device)).to(param_dtype)
    dy = torch.randn(case.shape, device=device).to(dtype)
    results = {}
    for name, fn in (("ours", group_norm), ("torch", F.group_norm), ("ref64", None)):
        xi, wi, bi = (_leaf(t.double() if fn is None else t) for t in (x, w, b))
        if fn is None:
            y = reference.differentiable_group_norm(xi, wi, bi, None, None, case.num_groups, 1e-5, "none")
        else:
            y = fn(xi, case.num_groups, wi, bi)
        y.backward(dy.double() if fn is None else dy)
        results[name] = [y.detach(), xi.grad, wi.grad, bi.grad]
    errors = {}
    ok = True
    for label, i in (("y", 0), ("dx", 1), ("dw", 2), ("db", 3)):
        ref = results["ref64"][i]
        ours = (results["ours"][i].double() - ref).abs().max().item()
        theirs = (results["torch"][i].double() - ref).abs().max().item()
        scale = ref.abs().max().item() + 1.0
        ok &= ours <= ERROR_FACTOR * theirs + FLOOR[dtype] * scale
        errors[label] = (ours, theirs)
    return {"case": case.name, "dtype": str(dtype).replace("torch.", ""),
            "format": "nhwc" if channels_last else "nchw", "ok": ok, "errors": errors}


def run_checks(cases: List[Case], device: str, dtypes) -> List[Dict]:
    rows = []
    for case in cases:
        for dtype in dtypes:
            for channels_last in (False, True):
                rows.append(check_case(case, dtype, device, channels_last))
    return rows


def checks_header(device: str) -> str:
    return (f"correctness on {device} (backend: {registry.backend_name(torch.device(device).type)}): "
            "max |err| vs float64 reference, ours / torch\n"
            "| case | dtype | format | y | dx | dweight | dbias | ok |\n|---|---|---|---|---|---|---|---|")


def format_check(r: Dict) -> str:
    """One table line of a check_case result."""
    cells = " | ".join(f"{o:.1e} / {t:.1e}" for o, t in r["errors"].values())
    return f"| {r['case']} | {r['dtype']} | {r['format']} | {cells} | {'PASS' if r['ok'] else 'FAIL'} |"


def format_checks(rows: List[Dict], device: str) -> str:
    return "\n".join([checks_header(device)] + [format_check(r) for r in rows])
