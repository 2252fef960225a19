"""Where the backward's time goes between ``torch.autograd.grad`` and the kernel.

    python benchmarks/backward_glue.py

The suite's "bwd" rows time ``torch.autograd.grad(y, (x, w, b), dy)`` on a fresh graph
(the forward untimed, just before). Here the same call is split into layers, ours
against ATen's, interleaved in one process (medians, two threads, float32):

* API: the suite's "bwd" row, ours (``groupnorm.group_norm``) and ATen's (``F.group_norm``);
* engine floor: the same autograd call on a Python ``autograd.Function`` whose backward
  returns precomputed gradients (what any Python-defined backward pays the engine);
* launcher: ``numba_cpu.backward_known``, what our Function's backward calls, against
  ATen's ``native_group_norm_backward`` (the kernel its C++ autograd node calls);
* entry: the compiled backward entry alone on preallocated outputs (no Python glue).

Read: API(ours) - launcher(ours) is the engine plus our Function; API(ATen) -
native(ATen) is the engine plus ATen's C++ node. That holds on small shapes; on mid
shapes the API rows also pay for the forward that just ran through the caches (and
ATen's for its allocator's page faults), so the difference there is not glue. The
fourteenth session's figures are in BENCHMARKS.md.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import groupnorm  # noqa: E402
from groupnorm.backends.numba_cpu import launch, threads  # noqa: E402
from groupnorm.backends.numba_cpu.addresses import WITNESS  # noqa: E402
from groupnorm.bench.timing import time_interleaved  # noqa: E402

CASES = [((2, 1280, 8, 8), False), ((2, 1280, 8, 8), True), ((2, 640, 32, 32), False), ((2, 640, 32, 32), True),
         ((2, 320, 64, 64), False), ((2, 320, 64, 64), True)]
GROUPS = 32
EPS = 1e-5
_F32 = WITNESS[torch.float32]
_ZERO = np.float32(0)


class PrecomputedBackward(torch.autograd.Function):
    """A Python Function with our Function's shape of work (saves x, w, b) whose
    backward returns gradients computed beforehand: the engine's floor."""

    @staticmethod
    def forward(ctx, x, weight, bias, grads):
        ctx.save_for_backward(x, weight, bias)
        ctx.grads = grads
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        ctx.saved_tensors
        return ctx.grads + (None,)


def split(shape, channels_last):
    n, c = shape[0], shape[1]
    hw = int(np.prod(shape[2:]))
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(c), torch.randn(c)
    dy = torch.randn_like(x)
    numel = x.numel()
    _, stats, stats_at = launch.forward_known_stats(x, x.shape, x.dtype, numel, channels_last, w, b, GROUPS, EPS,
                                                    "none")
    _, mean, rstd = torch.ops.aten.native_group_norm(x, w, b, n, c, hw, GROUPS, EPS)
    dx, dw, db = torch.empty_like(x), torch.empty_like(w), torch.empty_like(b)
    sums = np.empty((2, n, c), np.float32)
    count = threads.sync_with_torch(numel, n * c)
    entry, stream = launch._backward_entry(n, c, hw, GROUPS, channels_last, count, numel, 4, True)

    def ours_api_setup():
        leaves = tuple(t.detach().requires_grad_() for t in (x, w, b))
        return groupnorm.group_norm(leaves[0], GROUPS, leaves[1], leaves[2], EPS), leaves

    def aten_api_setup():
        leaves = tuple(t.detach().requires_grad_() for t in (x, w, b))
        return F.group_norm(leaves[0], GROUPS, leaves[1], leaves[2], EPS), leaves

    def floor_setup():
        leaves = tuple(t.detach().requires_grad_() for t in (x, w, b))
        return PrecomputedBackward.apply(*leaves, (dx, dw, db)), leaves

    def backward(made):
        y, leaves = made
        return torch.autograd.grad(y, leaves, dy)

    def entry_alone():
        entry(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), _F32, n, c, hw, True, stream, stats_at,
              stats_at + 4 * n * GROUPS, _F32, GROUPS, w.data_ptr(), c, _ZERO, b.data_ptr(), c, _ZERO, 0, 0, _ZERO,
              0, 0, _ZERO, 0, _ZERO, sums[0], sums[1], dw.data_ptr(), c, _ZERO, db.data_ptr(), c, _ZERO, count)

    sides = [
        (backward, ours_api_setup),
        (backward, aten_api_setup),
        (backward, floor_setup),
        (lambda: launch.backward_known(dy, x, stats, stats_at, w, b, x.shape, x.dtype, numel, channels_last, GROUPS,
                                       "none", True, True, True), None),
        (lambda: torch.ops.aten.native_group_norm_backward(dy, x, mean, rstd, w, n, c, hw, GROUPS,
                                                           [True, True, True]), None),
        (entry_alone, None),
    ]
    # The launcher and the entry write the same gradients as the API (checked first).
    want = backward(ours_api_setup())
    got = launch.backward_known(dy, x, stats, stats_at, w, b, x.shape, x.dtype, numel, channels_last, GROUPS, "none",
                                True, True, True)
    assert all(torch.equal(g, h) for g, h in zip(got, want)), "launcher and API differ"
    entry_alone()
    assert torch.equal(dx, want[0]) and torch.equal(dw, want[1]) and torch.equal(db, want[2]), "entry differs"
    timings = time_interleaved([fn for fn, _ in sides], setups=[setup for _, setup in sides], rounds=8,
                               budget_s=4.0, max_runs=3000)
    cells = " | ".join(f"{t.median_us:.1f}" for t in timings)
    fmt = "NHWC" if channels_last else "NCHW"
    print(f"| {'x'.join(map(str, shape))} | {fmt} | {cells} |", flush=True)


def main() -> None:
    torch.set_num_threads(2)
    numba.set_num_threads(2)
    print(f"torch {torch.__version__}, numba {numba.__version__}, threads 2, float32 backward "
          f"(dx, dweight, dbias); medians in us")
    print("| shape | format | API ours | API ATen | engine floor (Python Function) | launcher ours | "
          "native ATen | entry ours |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for shape, channels_last in CASES:
        split(shape, channels_last)


if __name__ == "__main__":
    main()
