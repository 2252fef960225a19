"""The PyTorch toolchain around our ops: opcheck, torch.compile, autocast, export, CUDA graphs.

Every check compares with torch.nn.GroupNorm (or eager mode) on inputs with a non-zero mean.
Compiles are few and tiny: each one costs seconds on a 2-core CPU.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import groupnorm
from groupnorm import ops

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def _input(shape, dtype=torch.float32, device="cpu", channels_last=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (-2.3 + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _vec(c, seed, device="cpu", dtype=torch.float32, base=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (base + 0.3 * torch.randn(c, generator=gen, dtype=torch.float64)).to(dtype).to(device)


def _model(device="cpu", dtype=torch.float32, fused=True):
    """Conv -> GroupNorm -> SiLU -> Conv -> GroupNorm(activation) -> Conv, all ours."""
    torch.manual_seed(0)
    act = "silu" if fused else None
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), groupnorm.GroupNorm(4, 16), nn.SiLU(),
        nn.Conv2d(16, 16, 3, padding=1), groupnorm.GroupNorm(8, 16, activation=act),
        nn.Conv2d(16, 4, 1),
    ).to(device=device, dtype=dtype)


# --- opcheck --------------------------------------------------------------------------

# (channels_last, affine, scale/shift, activation): layouts, optional tensors and epilogues.
CASES = [
    (False, True, False, "none"),
    (True, True, True, "silu"),
    (False, False, True, "gelu"),
    (True, False, False, "mish"),
]


def _op_args(device, channels_last, affine, modulated, activation, requires_grad):
    n, c, g = 2, 8, 4
    x = _input((n, c, 5, 3), device=device, channels_last=channels_last)
    w = _vec(c, 1, device) if affine else None
    b = _vec(c, 2, device, base=0.0) if affine else None
    scale = (0.2 * _input((n, c), device=device, seed=3) + 0.4) if modulated else None
    shift = _input((n, c), device=device, seed=4) if modulated else None
    if requires_grad:
        for t in (x, w, b, scale, shift):
            if t is not None:
                t.requires_grad_(True)
    y, mean, rstd = ops.forward(x.detach(), *(None if t is None else t.detach() for t in (w, b, scale, shift)),
                                g, 1e-5, activation)
    dy = _input(y.shape, device=device, seed=5).contiguous(memory_format=(
        torch.channels_last if channels_last else torch.contiguous_format))
    return dict(x=x, w=w, b=b, scale=scale, shift=shift, g=g, act=activation, mean=mean, rstd=rstd, dy=dy)


def _sample_calls(a):
    """One representative argument tuple for every op in groupnorm.ops."""
    x = a["x"].detach()
    p = tuple(None if t is None else t.detach() for t in (a["w"], a["b"], a["scale"], a["shift"]))
    g, act, mean, rstd, dy = a["g"], a["act"], a["mean"], a["rstd"], a["dy"]
    s_xhat, s_dz = ops.backward_reduce(dy, x, mean, rstd, *p, g, act)
    s1, s2 = groupnorm.grad_terms.group_sums(s_xhat, s_dz, p[0], p[2], g)
    count = x.numel() // (x.shape[0] * g)
    return {
        "forward": (a["x"], a["w"], a["b"], a["scale"], a["shift"], g, 1e-5, act),
        "stats": (x, g),
        "apply": (x, mean, rstd, *p, g, act),
        "backward_reduce": (dy, x, mean, rstd, *p, g, act),
        "backward_dx": (dy, x, mean, rstd, *p, s1, s2, count, g, act),
        "backward": (dy, x, mean, rstd, *p, g, act, True),
    }


def _registered_ops():
    return [name for name in dir(torch.ops.groupnorm) if isinstance(
        getattr(torch.ops.groupnorm, name, None), torch._ops.OpOverloadPacket)]


def test_every_registered_op_has_an_opcheck_sample():
    a = _op_args("cpu", *CASES[0], requires_grad=False)
    assert set(_registered_ops()) <= set(_sample_calls(a)), "a new op needs a sample in _sample_calls"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"cl{int(c[0])}-aff{int(c[1])}-mod{int(c[2])}-{c[3]}")
def test_opcheck(device, case):
    a = _op_args(device, *case, requires_grad=True)
    for name, args in _sample_calls(a).items():
        op = getattr(torch.ops.groupnorm, name).default
        torch.library.opcheck(op, args)


# --- torch.compile --------------------------------------------------------------------

@pytest.mark.slow  # cold, inductor's first compile probes the C++ toolchain (~80 s on 2 cores)
def test_compile_inductor_fullgraph_matches_eager():
    # No elementwise modules: inductor then emits no C++ kernels to compile (seconds each).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), groupnorm.GroupNorm(4, 16, activation="silu"),
                          nn.Conv2d(16, 16, 3, padding=1), groupnorm.GroupNorm(8, 16))
    x = _input((2, 3, 12, 12))
    expected = model(x)
    # fullgraph=True raises on any graph break.
    actual = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_compile_aot_eager_forward_backward_matches_eager(channels_last):
    model = _model()
    x = _input((2, 3, 10, 6), channels_last=channels_last)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    grads = []
    for fn in (model, compiled):
        model.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        (y * _input(y.shape, seed=7)).sum().backward()
        grads.append((y.detach(), xi.grad, [p.grad.clone() for p in model.parameters()]))
    (y0, dx0, dp0), (y1, dx1, dp1) = grads
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(dx1, dx0)
    for g1, g0 in zip(dp1, dp0):
        torch.testing.assert_close(g1, g0)


def test_compile_dynamic_three_resolutions_one_graph():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    model = _model()
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    # A square first input would pin H == W (duck sizing) and recompile once for non-square ones.
    for hw in ((12, 20), (8, 8), (16, 10)):
        x = _input((2, 3, *hw))
        torch.testing.assert_close(compiled(x), model(x))
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for 3 resolutions"


def test_compile_sees_one_custom_op_per_norm():
    explanation = torch._dynamo.explain(_model())(_input((2, 3, 8, 8)))
    assert explanation.graph_break_count == 0
    code = "\n".join(g.code for g in explanation.graphs)
    assert code.count("torch.ops.groupnorm.forward") == 2


@pytest.mark.parametrize("params", ["tensors", "parameters", "none"])
def test_compile_sees_the_functional_call_as_one_op(params):
    """group_norm called directly (not through a module) with plain tensor, Parameter or
    no weights: no graph break, one custom op, whatever eager shortcuts the call takes."""
    w, b = torch.randn(8), torch.randn(8)
    if params == "parameters":
        w, b = torch.nn.Parameter(w), torch.nn.Parameter(b)
    elif params == "none":
        w = b = None
    x = _input((2, 8, 6, 6))
    explanation = torch._dynamo.explain(lambda t: groupnorm.group_norm(t, 4, w, b))(x)
    assert explanation.graph_break_count == 0
    assert "\n".join(g.code for g in explanation.graphs).count("torch.ops.groupnorm.forward") == 1


# --- autocast -------------------------------------------------------------------------

@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_cpu_follows_torch(in_dtype, fast_dtype):
    peer = nn.GroupNorm(4, 8)
    with torch.no_grad():
        peer.weight.copy_(_vec(8, 1))
        peer.bias.copy_(_vec(8, 2, base=0.0))
    ours = groupnorm.GroupNorm(4, 8)
    ours.load_state_dict(peer.state_dict())
    x = _input((2, 8, 6, 5), dtype=in_dtype)
    with torch.autocast("cpu", dtype=fast_dtype):
        expected, actual = peer(x), ours(x)
    assert actual.dtype == expected.dtype
    tol = 1e-5 if in_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["forward", "apply"])
def test_autocast_rules_registered_for_cuda_only(name):
    # Checkable without a GPU: the CUDA rule exists, and CPU keeps torch's "no rule" behaviour.
    op = getattr(torch.ops.groupnorm, name).default
    assert op.has_kernel_for_dispatch_key(torch._C.DispatchKey.AutocastCUDA)
    assert not op.has_kernel_for_dispatch_key(torch._C.DispatchKey.AutocastCPU)


@needs_cuda
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_cuda_follows_torch(in_dtype, fast_dtype):
    peer = nn.GroupNorm(4, 8).cuda()
    ours = groupnorm.GroupNorm(4, 8).cuda()
    ours.load_state_dict(peer.state_dict())
    x = _input((2, 8, 6, 5), dtype=in_dtype, device="cuda").requires_grad_(True)
    with torch.autocast("cuda", dtype=fast_dtype):
        expected, actual = peer(x), ours(x)
    assert actual.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    dx_peer, = torch.autograd.grad(expected.sum(), x)
    dx_ours, = torch.autograd.grad(actual.sum(), x)
    assert dx_ours.dtype == dx_peer.dtype == in_dtype
    torch.testing.assert_close(dx_ours.float(), dx_peer.float(), rtol=2e-2, atol=2e-2)


# --- torch.export ---------------------------------------------------------------------

def test_export_runs_and_matches_eager():
    from groupnorm.convert import revert

    model = _model().eval()
    x = _input((2, 3, 8, 8))
    program = torch.export.export(model, (x,))
    assert "groupnorm.forward" in str(program.graph)
    torch.testing.assert_close(program.module()(x), model(x))
    # The reverted twin exports to aten's group_norm and gives the same numbers.
    torch_program = torch.export.export(revert(_model().eval()), (x,))
    assert "groupnorm" not in str(torch_program.graph)
    torch.testing.assert_close(program.module()(x), torch_program.module()(x), rtol=1e-5, atol=1e-5)


def test_export_dynamic_spatial_dims():
    model = _model().eval()
    h, w = torch.export.Dim("h", min=4, max=64), torch.export.Dim("w", min=4, max=64)
    program = torch.export.export(model, (_input((2, 3, 8, 8)),), dynamic_shapes=({2: h, 3: w},))
    x = _input((2, 3, 12, 20))
    torch.testing.assert_close(program.module()(x), model(x))


# --- CUDA graphs ----------------------------------------------------------------------

@needs_cuda
def test_cuda_graph_capture_and_replay():
    model = _model("cuda").eval()
    static_x = _input((2, 3, 16, 16), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):  # warm up: kernel compilation and allocations happen outside capture
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_y = model(static_x)
    for seed in (1, 2):
        x = _input((2, 3, 16, 16), device="cuda", seed=seed)
        static_x.copy_(x)
        graph.replay()
        with torch.no_grad():
            torch.testing.assert_close(static_y, model(x))
