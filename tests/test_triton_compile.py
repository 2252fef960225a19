"""torch.compile's view of the ops on CUDA tensors (groupnorm.triton_registration): the
functionalised graph holds our Triton launches as ``triton_kernel_wrapper_functional``
nodes (Inductor launches those itself), one per launch of the plan; CPU tensors keep the
opaque op.

Traced on CPU fake tensors in a subprocess without TRITON_INTERPRET (the interpreter's
kernels are not JITFunctions, which wrap_triton leaves alone), with the rule told that
Triton runs the CPU tensors. The GPU run of the same (compile default / reduce-overhead)
is in test_toolchain-style checks of benchmarks/gpu_check.py.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import json, sys, torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch._subclasses.functional_tensor import dispatch_functionalize
from groupnorm import ops, triton_registration
from groupnorm.backends import registry
from groupnorm.backends.triton_gpu import plan

def nodes(fn, *args):
    gm = make_fx(dispatch_functionalize(fn), tracing_mode="fake")(*args)
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]

def count(targets, name):
    return sum(name in t for t in targets)

x = torch.randn(2, 8, 5, 6)
xcl = x.contiguous(memory_format=torch.channels_last)
w, b = torch.randn(8), torch.randn(8)
out = {}
fwd = lambda t, w, b: ops.forward(t, w, b, None, None, 4, 1e-5, "silu")[0]
out["opaque_on_cpu"] = count(nodes(fwd, x, w, b), "groupnorm.forward")
triton_registration._triton_runs = lambda t: isinstance(t, torch.Tensor)
with registry.use_backend("triton", "cpu"):
    for name, small in (("fused", None), ("group", 0)):
        if small is not None:
            plan.FUSED_MAX_GROUP = 0
        for layout, t in (("nchw", x), ("cl", xcl)):
            f = nodes(fwd, t, w, b)
            mean = torch.zeros(2, 4)
            rstd = torch.ones(2, 4)
            bwd = lambda dy, t, m, r, w, b: ops.backward(dy, t, m, r, w, b, None, None, 4, "silu", True)
            g = nodes(bwd, t.clone(), t, mean, rstd, w, b)
            out[f"{name}-{layout}"] = [count(f, "triton_kernel_wrapper"), count(f, "groupnorm."),
                                      count(g, "triton_kernel_wrapper"), count(g, "groupnorm.")]
    plan.GROUP_MAX_GROUP = 0
    f = nodes(fwd, x, w, b)
    out["split"] = [count(f, "triton_kernel_wrapper"), count(f, "groupnorm.")]
print("RESULT" + json.dumps(out))
"""


def test_cuda_ops_decompose_into_triton_launches():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    out = json.loads(line[0][len("RESULT"):])
    assert out["opaque_on_cpu"] == 1
    for name in ("fused-nchw", "fused-cl", "group-nchw", "group-cl"):
        # forward: one launch, no opaque op; backward: group sums + dx, then dweight/dbias.
        assert out[name] == [1, 0, 2, 0], (name, out[name])
    assert out["split"] == [2, 0]


import torch  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_on_cuda_launches_our_kernels(mode, channels_last):
    """torch.compile of the module on CUDA: Inductor's code launches our Triton kernels
    (no opaque op), forward and backward agree with eager, CUDA graphs replay them."""
    import groupnorm
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = groupnorm.GroupNorm(8, 64).cuda()
    x = torch.randn(2, 64, 12, 12, device="cuda", dtype=torch.float16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    dy = torch.randn_like(x)
    y_ref = model(x)
    grads_ref = torch.autograd.grad(y_ref, (x, model.weight, model.bias), dy)
    compiled = torch.compile(model, mode=mode, fullgraph=True)

    def step():
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        y = compiled(x)
        return (y.detach().clone(), *torch.autograd.grad(y, (x, model.weight, model.bias), dy))

    out, codes = run_and_get_code(step)
    text = "\n".join(codes)
    assert "groupnorm.forward" not in text and "groupnorm.backward" not in text
    assert "fused_forward_kernel" in text or "group_forward_kernel" in text
    assert "group_backward_kernel" in text
    for _ in range(3):   # replays (CUDA graphs in reduce-overhead)
        out = step()
    for ours, ref in zip(out, (y_ref, *grads_ref)):
        torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-3, atol=2e-3)
