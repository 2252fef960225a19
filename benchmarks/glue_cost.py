"""Where a contiguous float32 forward's time goes between the user's call and the kernel.

    python benchmarks/glue_cost.py

Times, interleaved in one process (medians, two threads, no gradients): the compiled
forward kernel alone (numpy arrays, fixed output), the launcher (``numba_cpu.forward_output``),
the public API (``groupnorm.group_norm``), a *lean* call (the least Python that reaches
the same kernel entry: a pooled output, one numpy statistics array, three addresses, one
call; no checks, so a measuring stick, not an API), a *checked lean* call (the same plus
every check of the everyday call written inline in one function: torch-function
dispatch, validation, modes, autocast, grad, layout, backend), ATen's ``F.group_norm``
and a copy of x. Then the cost of single operations right after a large kernel call ("cold", caches
just flushed by the kernel) against the same operation in a tight loop ("warm").

The lean call gives the same bits as the API (checked first).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from torch.overrides import has_torch_function_variadic  # noqa: E402

from groupnorm import eager, group_norm, validation  # noqa: E402
from groupnorm.backends import numba_cpu, registry  # noqa: E402
from groupnorm.backends.numba_cpu import alloc  # noqa: E402
from groupnorm.backends.numba_cpu.addresses import WITNESS, forward_groups_at  # noqa: E402
from groupnorm.backends.numba_cpu.forward_kernels import forward_groups  # noqa: E402
from groupnorm.bench.timing import time_interleaved  # noqa: E402

SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (1, 512, 64, 64), (2, 1280, 8, 8)]
GROUPS = 32
_F32 = WITNESS[torch.float32]
_ZERO = np.float32(0)


def lean_forward(x, groups, w, b, eps):
    """The least Python that reaches the contiguous float32 entry (no checks)."""
    n, c = x.shape[0], x.shape[1]
    y, _ = alloc.output_tensor_like(x, False)
    stats = np.empty((2, n, groups), np.float32)
    forward_groups_at(x.data_ptr(), y.data_ptr(), _F32, n, c, x.numel() // (n * c), w.data_ptr(), c, _ZERO,
                      b.data_ptr(), c, _ZERO, 0, 0, _ZERO, 0, 0, _ZERO, eps, 0, _ZERO, stats[0], stats[1], None, 2)
    return y


_MODES = (torch._C._is_torch_function_mode_enabled, torch._C._len_torch_dispatch_stack, torch.compiler.is_compiling)


def checked_lean_forward(x, groups, w=None, b=None, eps=1e-5):
    """lean_forward behind every check the API makes for an everyday no-grad call, inline
    (None where the API's general path would be needed). Contiguous float32 only."""
    if has_torch_function_variadic(x, w, b) or type(x) is not torch.Tensor or type(groups) is not int:
        return None
    shape = x.shape
    if groups <= 0 or len(shape) < 2 or shape[1] % groups or x.dtype is not torch.float32 or not x.is_cpu:
        return None
    if x.numel() == groups:
        return None
    for t in (w, b):
        if t is not None and (type(t) is not torch.Tensor or t.shape != (shape[1],) or not t.is_cpu
                              or t.requires_grad or t.dtype is not torch.float32):
            return None
    if not eager.ENABLED or any(mode() for mode in _MODES) or torch._C._functorch.is_functorch_wrapped_tensor(x):
        return None
    if torch.is_autocast_enabled("cpu") or (torch.is_grad_enabled() and x.requires_grad) or not x.is_contiguous():
        return None
    if registry.backend_for("cpu") is not numba_cpu:
        return None
    return lean_forward(x, groups, w, b, eps)


def split(shape):
    n, c = shape[0], shape[1]
    hw = int(np.prod(shape[2:]))
    x = torch.randn(shape)
    w, b = torch.randn(c), torch.randn(c)
    y = np.empty((n * GROUPS, c // GROUPS * hw), np.float32)
    mean, rstd = np.empty((n, GROUPS), np.float32), np.empty((n, GROUPS), np.float32)
    empty = np.empty(0, np.float32)
    xg, wn, bn = x.numpy().reshape(n * GROUPS, -1), w.numpy(), b.numpy()
    assert torch.equal(lean_forward(x, GROUPS, w, b, 1e-5), group_norm(x, GROUPS, w, b))
    assert torch.equal(checked_lean_forward(x, GROUPS, w, b, 1e-5), group_norm(x, GROUPS, w, b))
    dst = torch.empty_like(x)
    sides = {
        "kernel": lambda: forward_groups(xg, y, hw, wn, bn, empty, empty, 1e-5, 0, _ZERO, mean, rstd, None, 2),
        "launcher": lambda: numba_cpu.forward_output(x, w, b, None, None, GROUPS, 1e-5, "none"),
        "API": lambda: group_norm(x, GROUPS, w, b),
        "lean": lambda: lean_forward(x, GROUPS, w, b, 1e-5),
        "checked lean": lambda: checked_lean_forward(x, GROUPS, w, b, 1e-5),
        "ATen": lambda: F.group_norm(x, GROUPS, w, b),
        "copy": lambda: dst.copy_(x),
    }
    timings = time_interleaved(list(sides.values()), rounds=10, budget_s=6.0, max_runs=3000)
    cells = " | ".join(f"{t.median_us:.1f}" for t in timings)
    print(f"| {'x'.join(map(str, shape))} | {cells} |", flush=True)


def cold_ops(rounds: int = 400) -> None:
    shape = SHAPES[0]
    x = torch.randn(shape)
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    y = torch.empty_like(x)
    ops = {
        "empty lambda": lambda: None,
        "x.shape": lambda: x.shape,
        "x.data_ptr()": lambda: x.data_ptr(),
        "torch.is_grad_enabled()": torch.is_grad_enabled,
        "np.empty((2, 2, 32))": lambda: np.empty((2, 2, 32), np.float32),
        "validation.common_case_ok": lambda: validation.common_case_ok(x, GROUPS, w, b),
        "registry.backend_for": lambda: registry.backend_for("cpu"),
        "alloc.output_tensor_like": lambda: alloc.output_tensor_like(x, False),
    }
    cold = {k: [] for k in ops}
    for _ in range(rounds):
        for name, op in ops.items():
            lean_forward(x, GROUPS, w, b, 1e-5)   # a 10 MB kernel flushes the caches
            t0 = time.perf_counter()
            op()
            cold[name].append(time.perf_counter() - t0)
    print("\n| operation | cold us | warm us |\n|---|---:|---:|")
    for name, op in ops.items():
        warm = []
        for _ in range(2000):
            t0 = time.perf_counter()
            op()
            warm.append(time.perf_counter() - t0)
        print(f"| {name} | {np.median(cold[name][rounds // 8:]) * 1e6:.2f} | {np.median(warm) * 1e6:.2f} |")
    del y


def main() -> None:
    torch.set_num_threads(2)
    numba.set_num_threads(2)
    print(f"torch {torch.__version__}, numba {numba.__version__}, threads 2, float32 contiguous forward, "
          f"no grad; medians in us")
    print("| shape | kernel | launcher | API | lean | checked lean | ATen | copy |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")
    for shape in SHAPES:
        split(shape)
    cold_ops()


if __name__ == "__main__":
    main()
