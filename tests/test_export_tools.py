"""TorchScript (trace and script), ONNX (both exporters, run by onnxruntime) and meta tensors:
our modules against torch's own layer on fresh random inputs."""
import io

import pytest
import torch
import torch.nn.functional as F

import groupnorm
from groupnorm import portable
from helpers import make_input

# The deprecation warnings of torch.jit.* and the TorchScript ONNX exporter are torch's, not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")


def _affine(m, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if m.weight is not None:
            m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
    return m


def _modules():
    """(name, our module, torch-ops function of (x, scale, shift), takes scale/shift)."""
    plain = _affine(groupnorm.GroupNorm(4, 8))
    act = _affine(groupnorm.GroupNormAct(4, 8, activation="gelu_tanh"))
    ada = groupnorm.GroupNormScaleShift(4, 8, activation="silu")
    return [
        ("plain", plain, lambda x, s, h: F.group_norm(x, 4, plain.weight, plain.bias), False),
        ("act", act, lambda x, s, h: F.gelu(F.group_norm(x, 4, act.weight, act.bias), approximate="tanh"), False),
        ("ada", ada, lambda x, s, h: F.silu(F.group_norm(x, 4) * (1 + s[..., None, None]) + h[..., None, None]),
         True),
    ]


def _call(m, x, s, h, modulated):
    return m(x, s, h) if modulated else m(x)


def _data(seed=1, channels_last=False):
    x = make_input((2, 8, 5, 6), torch.float32, channels_last=channels_last, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    return x, 0.3 * torch.randn(2, 8, generator=gen), 0.3 * torch.randn(2, 8, generator=gen)


@pytest.mark.parametrize("name,module,want,modulated", _modules(), ids=[m[0] for m in _modules()])
def test_jit_trace_records_our_op_and_generalises(name, module, want, modulated):
    x, s, h = _data()
    args = (x, s, h) if modulated else (x,)
    traced = torch.jit.trace(module, args)
    assert "groupnorm::forward" in str(traced.graph)   # our kernels stay in the traced graph
    x2, s2, h2 = _data(seed=7)                         # other values than those traced
    got = traced(x2, s2, h2) if modulated else traced(x2)
    torch.testing.assert_close(got, want(x2, s2, h2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,module,want,modulated", _modules(), ids=[m[0] for m in _modules()])
def test_jit_script_runs_torch_ops_with_our_parameters(name, module, want, modulated):
    scripted = torch.jit.script(module)
    assert set(scripted.state_dict()) == set(module.state_dict())
    x, s, h = _data(seed=3, channels_last=True)
    got = _call(scripted, x, s, h, modulated)
    torch.testing.assert_close(got, want(x, s, h), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, _call(module, x, s, h, modulated), rtol=1e-5, atol=1e-5)


def test_jit_script_inside_a_model_and_sharded_refusal():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), groupnorm.GroupNorm(4, 8), torch.nn.SiLU())
    scripted = torch.jit.script(model)
    x = make_input((2, 3, 6, 6), seed=4)
    torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)
    sharded = groupnorm.GroupNorm(4, 8)
    sharded.process_group = object()   # stands for a real group: scripting must refuse before using it
    with pytest.raises(RuntimeError, match="process_group"):
        torch.jit.script(sharded)


onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _run_onnx(model_bytes, inputs):
    runtime = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    names = [i.name for i in runtime.get_inputs()]
    return runtime.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]


def _export(module, args, dynamo):
    if dynamo:
        program = torch.onnx.export(module, args, dynamo=True, verbose=False)
        return program.model_proto.SerializeToString()
    buffer = io.BytesIO()
    torch.onnx.export(module, args, buffer, dynamo=False, opset_version=18)
    return buffer.getvalue()


class _WithExtras(torch.nn.Module):
    """GroupNormScaleShift's forward takes scale/shift: wrap it so exporters see three inputs."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, s, h):
        return self.inner(x, s, h)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name,module,want,modulated", _modules(), ids=[m[0] for m in _modules()])
def test_onnx_export_standard_ops_match(name, module, want, modulated, dynamo):
    x, s, h = _data(seed=5)
    model = _WithExtras(module) if modulated else module
    args = (x, s, h) if modulated else (x,)
    proto = onnx.load_from_string(_export(model, args, dynamo))
    domains = {node.domain for node in proto.graph.node}
    assert domains <= {"", "ai.onnx", "pkg.onnxscript.torch_lib.common"}, domains   # standard ONNX ops only
    x2, s2, h2 = _data(seed=9)
    got = torch.from_numpy(_run_onnx(proto.SerializeToString(), (x2, s2, h2) if modulated else (x2,)))
    torch.testing.assert_close(got, want(x2, s2, h2), rtol=1e-4, atol=1e-4)


def test_portable_composition_matches_our_kernels():
    x, s, h = _data(seed=11)
    w, b = torch.randn(8), torch.randn(8)
    for act in groupnorm.ACTIVATIONS:
        ours = groupnorm.group_norm(x, 4, w, b, activation=act, scale=s, shift=h)
        torch.testing.assert_close(portable.torch_group_norm(x, 4, w, b, 1e-5, act, s, h), ours,
                                   rtol=2e-5, atol=2e-5)


# --- meta tensors -------------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_meta_forward_and_backward(channels_last, autocast):
    m = groupnorm.GroupNorm(4, 8, device="meta")
    x = torch.empty(2, 8, 5, 6, device="meta", requires_grad=True)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        y = m(x)
        ref = torch.nn.GroupNorm(4, 8, device="meta")(x)
    assert y.device.type == "meta" and y.shape == ref.shape and y.dtype == ref.dtype
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    y.sum().backward()
    assert x.grad.shape == x.shape and m.weight.grad.shape == (8,) and m.bias.grad.shape == (8,)
    assert x.grad.device.type == "meta"


def test_meta_fused_and_functional():
    x = torch.empty(3, 8, 4, device="meta")
    s = torch.empty(3, 8, device="meta")
    y = groupnorm.group_norm(x, 2, activation="mish", scale=s, shift=s)
    assert y.shape == x.shape and y.device.type == "meta"


# --- converted diffusers models ---------------------------------------------------------

diffusers = pytest.importorskip("diffusers")


def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(16, 32), norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def _tiny_vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                                   norm_num_groups=8, latent_channels=4,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2).eval()


class _UNetCall(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        return self.unet(x, t).sample


class _Decode(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z).sample


def _model_cases():
    gen = torch.Generator().manual_seed(2)
    return [("unet", lambda: _UNetCall(_tiny_unet()), (torch.randn(1, 3, 8, 8, generator=gen), torch.tensor([10]))),
            ("vae_decoder", lambda: _Decode(_tiny_vae()), (torch.randn(1, 4, 4, 4, generator=gen),))]


@pytest.mark.parametrize("name,build,args", _model_cases(), ids=[c[0] for c in _model_cases()])
def test_converted_diffusers_model_traces_and_exports(name, build, args):
    stock = build()
    converted = groupnorm.convert(build())
    assert any(isinstance(m, groupnorm.GroupNorm) for m in converted.modules())
    with torch.no_grad():
        want = stock(*args)
        traced = torch.jit.trace(converted, args, check_trace=False)
        torch.testing.assert_close(traced(*args), want, rtol=1e-4, atol=1e-4)
    buffer = io.BytesIO()
    torch.onnx.export(converted, args, buffer, dynamo=False, opset_version=18)
    got = torch.from_numpy(_run_onnx(buffer.getvalue(), args))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
