"""The torch.compile pass: groupnorm::forward -> [* (1 + scale) + shift] -> activation becomes
one fused op call, matches eager, and leaves every other pattern alone.

Most cases run the pass on the graph Dynamo captures (a backend that applies it and runs the
graph as Python: fast); one case goes through Inductor end to end."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import groupnorm
from groupnorm import compile_fusion

FORWARD = torch.ops.groupnorm.forward.default
ACTIVATIONS = {
    "silu": nn.SiLU(),
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "mish": F.mish,
}
ACTIVATION_TARGETS = {F.silu, F.gelu, torch._C._nn.gelu, F.relu, torch.relu, F.mish}


def _randn(shape, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (0.2 + torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)


def _norm(channels=8, groups=4):
    norm = groupnorm.GroupNorm(groups, channels)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * _randn((channels,), 90))
        norm.bias.copy_(0.3 * _randn((channels,), 91))
    return norm


class Captured:
    """A torch.compile backend that runs the pass on Dynamo's graph and keeps the result."""

    def __init__(self, small_cpu_elements=0):
        self.graphs, self.fused, self.small = [], 0, small_cpu_elements

    def __call__(self, gm, example_inputs):
        self.fused += compile_fusion.fuse_graph(gm.graph, small_cpu_elements=self.small)
        gm.graph.lint()
        gm.recompile()
        self.graphs.append(gm.graph)
        return gm.forward

    def calls(self):
        """(scale given, shift given, activation) of every groupnorm::forward left."""
        return [(n.args[3] is not None, n.args[4] is not None, n.args[7])
                for g in self.graphs for n in g.nodes if n.target is FORWARD]

    def activation_nodes(self):
        return [n for g in self.graphs for n in g.nodes
                if n.target in ACTIVATION_TARGETS or (n.op == "call_method" and n.target == "relu")]


def _modulated(norm, act, order):
    def f(x, emb):
        scale, shift = emb[:, :, None, None].chunk(2, dim=1)
        h = norm(x)
        h = h * (1 + scale) + shift if order == "1+s" else (scale + 1) * h + shift
        return act(h)
    return f


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("modulated", [False, True])
def test_activation_and_modulation_fuse_into_the_op(name, modulated):
    torch._dynamo.reset()
    norm, act = _norm(), ACTIVATIONS[name]
    f = _modulated(norm, act, "1+s" if name != "relu" else "s+1") if modulated else (lambda x, emb: act(norm(x)))
    backend = Captured()
    x, emb = _randn((2, 8, 5, 5), 1).requires_grad_(), _randn((2, 16), 2).requires_grad_()
    y = torch.compile(f, backend=backend, fullgraph=True)(x, emb)
    assert backend.fused == 1
    assert backend.calls() == [(modulated, modulated, name)] and backend.activation_nodes() == []
    with torch.no_grad():
        expected = f(x, emb)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    dy = _randn(y.shape, 3)
    inputs = [x, norm.weight, norm.bias] + ([emb] if modulated else [])
    grads = torch.autograd.grad(y, inputs, dy)
    expected_grads = torch.autograd.grad(f(x, emb), inputs, dy)
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def _unrecognised(why):
    norm = _norm()
    if why == "output used twice":
        def f(x, emb):
            h = norm(x)
            return F.silu(h) + h
        return f
    if why == "tanh":
        return lambda x, emb: torch.tanh(norm(x))
    if why == "broadcast scale":
        return lambda x, emb: F.silu(norm(x) * (1 + emb[:1, :8, None, None]) + emb[:1, 8:, None, None])
    if why == "promoting scale":
        return lambda x, emb: F.silu(norm(x) * (1 + emb.double()[:, :8, None, None]) + emb.double()[:, 8:, None, None])
    if why == "statistics used":
        def g(x, emb):
            out = FORWARD(x, norm.weight, norm.bias, None, None, 4, 1e-5, "none")
            return F.silu(out[0]) + out[1].sum()
        return g
    raise AssertionError(why)


@pytest.mark.parametrize("why", ["output used twice", "tanh", "broadcast scale", "promoting scale",
                                 "statistics used"])
def test_unrecognised_patterns_are_left_alone_and_correct(why):
    torch._dynamo.reset()
    f = _unrecognised(why)
    backend = Captured()
    x, emb = _randn((2, 8, 5, 5), 4), _randn((2, 16), 5)
    y = torch.compile(f, backend=backend, fullgraph=True)(x, emb)
    assert backend.fused == 0 and all(act == "none" for *_, act in backend.calls())
    torch.testing.assert_close(y, f(x, emb), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused_before", [False, True])
def test_small_cpu_inputs_go_to_inductors_group_norm(fused_before):
    # Below the size limit the chain (or an op already fused by convert) becomes F.group_norm
    # -> modulation -> activation, which Inductor fuses into one loop.
    torch._dynamo.reset()
    norm = _norm()
    if fused_before:
        def f(x, emb):
            scale, shift = emb.chunk(2, dim=1)
            return groupnorm.group_norm(x, 4, norm.weight, norm.bias, 1e-5, activation="gelu_tanh",
                                        scale=scale, shift=shift)
    else:
        f = _modulated(norm, ACTIVATIONS["gelu_tanh"], "1+s")
    backend = Captured(small_cpu_elements=2 * 8 * 5 * 5 + 1)
    x, emb = _randn((2, 8, 5, 5), 9).requires_grad_(), _randn((2, 16), 10).requires_grad_()
    y = torch.compile(f, backend=backend, fullgraph=True)(x, emb)
    assert backend.fused == 1 and backend.calls() == []
    assert [n.target for g in backend.graphs for n in g.nodes if n.target in (F.group_norm, F.gelu)] \
        == [F.group_norm, F.gelu]
    expected = f(x, emb)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    dy = _randn(y.shape, 11)
    for ours, theirs in zip(torch.autograd.grad(y, [x, emb, norm.weight], dy),
                            torch.autograd.grad(expected, [x, emb, norm.weight], dy)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


class Block(nn.Module):
    """UNet-like: conv -> norm -> SiLU, conv -> norm -> time scale/shift -> SiLU, residual."""

    def __init__(self, channels=32, groups=8, temb=16):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.proj = nn.Linear(temb, 2 * channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x, temb):
        h = self.act(self.norm1(self.conv1(x)))
        scale, shift = self.proj(temb)[:, :, None, None].chunk(2, dim=1)
        h = self.act(self.norm2(h) * (1 + scale) + shift)
        return x + self.conv2(h)


def test_inductor_runs_the_pass_and_matches_eager(monkeypatch):
    # End to end through Inductor (C++ codegen: the slow case, so one model, train mode).
    monkeypatch.setattr(compile_fusion, "SMALL_CPU_ELEMENTS", 0)   # keep our op at this size
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = Block()
    model = groupnorm.convert(Block(), fuse=True)
    model.load_state_dict(ref.state_dict())
    seen = []

    def spy(graph):
        seen.extend(n.args[7] for n in graph.nodes if n.target is FORWARD)

    from torch._inductor.custom_graph_pass import CustomGraphPass

    class Spy(CustomGraphPass):
        def __call__(self, graph):
            spy(graph)

        def uuid(self):
            return None   # no caching: the spy must see the graph

    options = {"pre_grad_custom_pass": [compile_fusion.fusion_pass(), Spy()]}
    compiled = torch.compile(model, options=options)
    x, temb = _randn((2, 32, 8, 8), 6).requires_grad_(), _randn((2, 16), 7)
    y = compiled(x, temb)
    assert seen == ["silu", "silu"]
    torch.testing.assert_close(y, ref(x, temb), rtol=1e-4, atol=1e-5)
    dy = _randn(y.shape, 8)
    grads = torch.autograd.grad(y, [x, *model.parameters()], dy)
    expected = torch.autograd.grad(ref(x, temb), [x, *ref.parameters()], dy)
    for ours, theirs in zip(grads, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max())


def test_enable_and_disable_keep_other_passes(monkeypatch):
    from torch._inductor import config

    monkeypatch.setattr(compile_fusion, "_CHOICE", [])

    def other(graph):
        return None

    with config.patch(pre_grad_custom_pass=other):
        compile_fusion.enable()
        compile_fusion.enable()   # idempotent
        assert config.pre_grad_custom_pass == [other, compile_fusion.fusion_pass()]
        compile_fusion.disable()
        assert config.pre_grad_custom_pass is other
    with config.patch(pre_grad_custom_pass=None):
        compile_fusion.enable()
        assert config.pre_grad_custom_pass is compile_fusion.fusion_pass()
        assert compile_fusion.options() == {"pre_grad_custom_pass": compile_fusion.fusion_pass()}
        compile_fusion.disable()
        assert config.pre_grad_custom_pass is None


def test_auto_enable_respects_the_users_choice(monkeypatch):
    from torch._inductor import config

    with config.patch(pre_grad_custom_pass=None):
        monkeypatch.setattr(compile_fusion, "_CHOICE", [])
        monkeypatch.setenv("GROUPNORM_COMPILE_FUSION", "0")
        compile_fusion.auto_enable()
        assert config.pre_grad_custom_pass is None
        monkeypatch.setattr(compile_fusion, "_CHOICE", [])
        monkeypatch.delenv("GROUPNORM_COMPILE_FUSION")
        compile_fusion.auto_enable()
        assert config.pre_grad_custom_pass is compile_fusion.fusion_pass()
        compile_fusion.disable()
        compile_fusion.auto_enable()
        assert config.pre_grad_custom_pass is None


def test_pass_is_on_by_default_once_compile_traces_our_op(monkeypatch):
    """No enable() call: tracing groupnorm::forward (its fake implementation) switches the
    pass on, and the compiled norm -> SiLU is one fused op call."""
    from torch._inductor import config

    with config.patch(pre_grad_custom_pass=None):
        monkeypatch.setattr(compile_fusion, "_CHOICE", [])
        monkeypatch.delenv("GROUPNORM_COMPILE_FUSION", raising=False)
        monkeypatch.setattr(compile_fusion, "SMALL_CPU_ELEMENTS", 0)
        torch._dynamo.reset()
        seen = []
        real = compile_fusion.fuse_graph

        def spy(graph, *a, **k):
            out = real(graph, *a, **k)
            seen.append([n.args[_ACT_INDEX] for n in graph.nodes if n.target is _FORWARD_OP])
            return out

        monkeypatch.setattr(compile_fusion, "fuse_graph", spy)
        model = torch.nn.Sequential(groupnorm.GroupNorm(4, 8), torch.nn.SiLU())
        x = _randn((2, 8, 4, 4), 21)
        y = torch.compile(model)(x)
        assert config.pre_grad_custom_pass is compile_fusion.fusion_pass()
        assert seen and seen[-1] == ["silu"]
        torch.testing.assert_close(y, F.silu(F.group_norm(x, 4, model[0].weight, model[0].bias)),
                                   rtol=1e-5, atol=1e-5)
        compile_fusion.disable()
        torch._dynamo.reset()


_FORWARD_OP = torch.ops.groupnorm.forward.default
_ACT_INDEX = 7
