"""convert(fuse=True) on diffusers blocks: every recognised norm -> activation (and time
scale/shift) runs as one fused call, outputs and gradients equal the stock model's, revert
gives the original modules back bit for bit; anything unrecognised is only swapped."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import groupnorm
from groupnorm import GroupNorm, convert, revert
from groupnorm.convert import FusedActivation

diffusers = pytest.importorskip("diffusers")
from diffusers.models.autoencoders.vae import Decoder, Encoder  # noqa: E402
from diffusers.models.normalization import AdaGroupNorm as DiffusersAdaGroupNorm  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D  # noqa: E402

fusion = pytest.importorskip("groupnorm.diffusers_fusion")


def _randn(shape, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (0.3 + torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)


def _randomize(model, seed=123, only_norms=False):
    # Fresh norms have weight 1 / bias 0 and fresh projections small weights: random values
    # make a wrongly placed activation or modulation visible. In a whole model only the
    # norms' (random weights everywhere make its float32 gradients ill-conditioned: 7%
    # apart between torch's own kernel and float64).
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if only_norms and not isinstance(m, nn.GroupNorm):
                continue
            for p in m.parameters(recurse=False):
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return model


def _unet(time_scale_shift):
    return diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        resnet_time_scale_shift=time_scale_shift)


def _unet_cond():
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=16, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _model(kind):
    if kind == "vae":
        return _vae()
    if kind == "unet-cond":
        return _unet_cond()
    return _unet(kind.split("-")[1])


def _vae():
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=16, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def _expected_fused(model):
    """Counted from the stock model's classes, independently of the adapters."""
    blocks = [m for m in model.modules() if type(m) is ResnetBlock2D]
    ends = [m for m in model.modules()
            if type(m) in (Encoder, Decoder, diffusers.UNet2DModel, diffusers.UNet2DConditionModel)]
    return 2 * len(blocks) + len(ends)


def _count_activation_calls(model):
    calls = []
    for m in model.modules():
        if type(m) in (nn.SiLU, nn.GELU, nn.Mish, nn.ReLU):
            m.register_forward_hook(lambda *a: calls.append(1))
    return calls


def _run(model, x, kind):
    if kind == "vae":
        return model(x, return_dict=False)[0]
    if kind == "unet-cond":
        return model(x, torch.tensor([3, 511]), encoder_hidden_states=_randn((x.shape[0], 5, 16), 30),
                     return_dict=False)[0]
    return model(x, torch.tensor([3, 511]), return_dict=False)[0]


def _input(kind, seed):
    return _randn((2, 4, 8, 8) if kind == "unet-cond" else (2, 3, 16, 16), seed)


def _assert_grads_close(model, ref, x_grads):
    grads = dict(ref.named_parameters())
    big = max(q.grad.abs().max() for q in grads.values() if q.grad is not None)
    for name, p in model.named_parameters():
        q = grads[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            # float32 sums in another order than torch's kernel; slack scaled to the largest
            # gradient (attention key biases have exact-zero gradients, rounding noise only).
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * big, msg=name)
    torch.testing.assert_close(x_grads[1], x_grads[0], rtol=1e-4, atol=1e-5 * x_grads[0].abs().max())


@pytest.mark.parametrize("kind", ["unet-default", "unet-scale_shift", "vae", "unet-cond"])
def test_models_fuse_every_recognised_pair_and_match_stock(kind):
    torch.manual_seed(0)
    ref = _randomize(_model(kind), only_norms=True)
    model, report = convert(copy.deepcopy(ref), fuse=True, report=True)
    n_norms = sum(type(m) is nn.GroupNorm for m in ref.modules())
    assert len(report.fused) == _expected_fused(ref) > 0
    assert len(report.fused) + len(report.swapped) == n_norms
    assert not any(type(m) is nn.GroupNorm for m in model.modules())
    for fqn in report.fused:
        assert model.get_submodule(fqn).activation == "silu"
    # The activation modules still run on time embeddings, never on a fused norm's output.
    ref_calls, calls = _count_activation_calls(ref), _count_activation_calls(model)
    x = _input(kind, 1)
    xs, outs = [x.clone().requires_grad_(), x.clone().requires_grad_()], []
    for m, xi in zip((ref, model), xs):
        y = _run(m, xi, kind)
        (y * _randn(y.shape, 2)).sum().backward()
        outs.append(y.detach())
    assert len(ref_calls) - len(calls) == len(report.fused)   # one activation call less per fused norm
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    _assert_grads_close(model, ref, [xi.grad for xi in xs])


@pytest.mark.parametrize("kind", ["unet-scale_shift", "vae", "unet-cond"])
def test_revert_gives_back_the_stock_model_bitwise(kind):
    torch.manual_seed(0)
    ref = _randomize(_model(kind), only_norms=True)
    model = copy.deepcopy(ref)
    params = dict(model.named_parameters())
    out = revert(convert(model, fuse=True))
    assert out is model and repr(model) == repr(ref)
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
    assert all(type(m).forward is type(r).forward for m, r in zip(model.modules(), ref.modules()))
    assert all(p is params[n] for n, p in model.named_parameters())
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert list(sd) == list(ref_sd) and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    x = _input(kind, 3)
    with torch.no_grad():
        assert torch.equal(_run(model, x, kind), _run(ref, x, kind))


# --- ResnetBlock2D: every configuration the adapter accepts, exactly -----------------------

BLOCK_CASES = {
    "default-silu": dict(time_embedding_norm="default"),
    "scale_shift-silu": dict(time_embedding_norm="scale_shift"),
    "scale_shift-gelu-up": dict(time_embedding_norm="scale_shift", non_linearity="gelu", up=True),
    "default-mish-down-shortcut": dict(non_linearity="mish", down=True, out_channels=24,
                                       output_scale_factor=2.0),
    "scale_shift-relu-skip_time_act": dict(time_embedding_norm="scale_shift", non_linearity="relu",
                                           skip_time_act=True, output_scale_factor=1.5),
    "default-no-temb-dropout": dict(temb_channels=None, dropout=0.5),
}


def _block(case):
    kwargs = dict(in_channels=16, temb_channels=12, groups=4, eps=1e-6)
    kwargs.update(BLOCK_CASES[case])
    torch.manual_seed(0)
    return _randomize(ResnetBlock2D(**kwargs))


@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_resnet_block_configurations_match_stock(case):
    ref = _block(case)
    block, report = convert(copy.deepcopy(ref), fuse=True, report=True)
    assert report.fused == ["norm1", "norm2"] and report.swapped == []
    assert type(block) is fusion.FusedResnetBlock2D and isinstance(block, ResnetBlock2D)
    expected_norm2 = groupnorm.GroupNormScaleShift if "scale_shift" in case else GroupNorm
    assert type(block.norm2) is expected_norm2 and block.norm1.activation == fusion.activation_of(ref.nonlinearity)
    x = _randn((2, 16, 8, 8), 4).requires_grad_()
    temb = None if ref.time_emb_proj is None else _randn((2, 12), 5).requires_grad_()
    grads = []
    for m in (ref, block):
        torch.manual_seed(7)   # the same dropout mask on both sides
        y = m(x, temb)
        inputs = [x] + ([temb] if temb is not None else []) + list(m.parameters())
        grads.append(torch.autograd.grad((y * _randn(y.shape, 6)).sum(), inputs))
        grads[-1] = (y.detach(),) + grads[-1]
    for ours, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max())
    revert(block)
    assert type(block) is ResnetBlock2D and repr(block) == repr(ref)


def test_scale_shift_with_one_embedding_for_the_batch():
    # A (1, 2C) embedding broadcast over the batch: stock broadcasting, same result fused.
    ref = _block("scale_shift-silu").eval()
    block = convert(copy.deepcopy(ref), fuse=True)
    x, temb = _randn((3, 16, 8, 8), 8), _randn((1, 12), 9)
    with torch.no_grad():
        torch.testing.assert_close(block(x, temb), ref(x, temb), rtol=1e-4, atol=1e-5)


def test_hook_on_fused_norm_sees_activated_output():
    # Documented: after fusion the norm returns the activation's output.
    block = convert(_block("default-silu").eval(), fuse=True)
    seen = []
    block.norm1.register_forward_hook(lambda m, i, o: seen.append(o))
    x = _randn((2, 16, 8, 8), 10)
    with torch.no_grad():
        block(x, _randn((2, 12), 11))
        plain = torch.nn.functional.group_norm(x, 4, block.norm1.weight, block.norm1.bias, 1e-6)
    torch.testing.assert_close(seen[0], torch.nn.functional.silu(plain), rtol=1e-5, atol=1e-6)


# --- what is not recognised is swapped, not fused, and stays correct -------------------------

class CustomBlock(ResnetBlock2D):
    """A subclass may have its own forward: the adapter must not replace it."""

    def forward(self, input_tensor, temb):
        return super().forward(input_tensor, temb) * 0.5


def _unrecognised(why):
    block = _block("default-silu")
    if why == "subclass":
        block.__class__ = CustomBlock
    elif why == "activation":
        block.nonlinearity = nn.Tanh()
    elif why == "gelu-subclass":
        block.nonlinearity = type("MyGELU", (nn.GELU,), {})()
    elif why == "hook":
        block.nonlinearity.register_forward_hook(lambda *a: None)
    elif why == "shared-norm":
        block.extra = block.norm2
    return block


@pytest.mark.parametrize("why", ["subclass", "activation", "gelu-subclass", "hook", "shared-norm", "filter"])
def test_unrecognised_blocks_are_swapped_not_fused(why):
    ref = _unrecognised(why)
    filter_fn = (lambda m, fqn: fqn != "norm2") if why == "filter" else None
    block, report = convert(copy.deepcopy(ref), fuse=True, filter_fn=filter_fn, report=True)
    assert report.fused == []
    assert type(block) is type(ref)
    assert all(m.activation == "none" for m in block.modules() if isinstance(m, GroupNorm))
    x, temb = _randn((2, 16, 8, 8), 12), _randn((2, 12), 13)
    with torch.no_grad():
        torch.testing.assert_close(block(x, temb), ref(x, temb), rtol=1e-4, atol=1e-5)


# --- diffusers' AdaGroupNorm and the block that uses it -------------------------------------

@pytest.mark.parametrize("act_fn", [None, "silu"])
def test_diffusers_ada_group_norm_fuses_its_modulation(act_fn):
    torch.manual_seed(0)
    ref = _randomize(DiffusersAdaGroupNorm(12, 16, 4, act_fn=act_fn))
    norm, report = convert(copy.deepcopy(ref), fuse=True, report=True)
    assert type(norm) is fusion.FusedAdaGroupNorm and report.fused == [""]
    x, emb = _randn((2, 16, 5, 5), 14).requires_grad_(), _randn((2, 12), 15).requires_grad_()
    results = []
    for m in (ref, norm):
        y = m(x, emb)
        results.append((y.detach(),) + torch.autograd.grad((y * _randn(y.shape, 16)).sum(),
                                                           [x, emb, *m.parameters()]))
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max())
    assert type(revert(norm)) is DiffusersAdaGroupNorm and "activation" not in norm.__dict__


def test_resnet_block_cond_norm_fuses_ada_norms_and_activation():
    torch.manual_seed(0)
    ref = _randomize(ResnetBlockCondNorm2D(in_channels=16, temb_channels=12, groups=4,
                                           time_embedding_norm="ada_group"))
    block, report = convert(copy.deepcopy(ref), fuse=True, report=True)
    assert report.fused == ["norm1", "norm2"]
    assert isinstance(block.nonlinearity, FusedActivation) and block.norm1.activation == "silu"
    x, temb = _randn((2, 16, 6, 6), 17), _randn((2, 12), 18)
    with torch.no_grad():
        torch.testing.assert_close(block(x, temb), ref(x, temb), rtol=1e-4, atol=1e-5)
    revert(block)
    assert repr(block) == repr(ref) and type(block.nonlinearity) is nn.SiLU
    assert all(type(m) is type(r) for m, r in zip(block.modules(), ref.modules()))


# --- the renamed module and its deprecated alias ------------------------------------------------

def test_group_norm_scale_shift_and_deprecated_alias():
    x, scale, shift = _randn((2, 8, 3, 3), 19), _randn((2, 8), 20), _randn((2, 8), 21)
    norm = groupnorm.GroupNormScaleShift(4, 8, activation="silu")
    expected = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4) * (1 + scale[..., None, None])
                                        + shift[..., None, None])
    torch.testing.assert_close(norm(x, scale, shift), expected, rtol=1e-5, atol=1e-6)
    with pytest.warns(DeprecationWarning, match="GroupNormScaleShift"):
        old = groupnorm.AdaGroupNorm(4, 8, 1e-5, activation="silu")
    assert isinstance(old, groupnorm.GroupNormScaleShift) and old.eps == 1e-5
    torch.testing.assert_close(old(x, scale, shift), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args, kwargs", [((16, 32, 8), {}), ((16, 32, 8, "silu"), {}),
                                          ((16, 32), dict(num_groups=8)), ((), dict(embedding_dim=16, out_dim=32))])
def test_deprecated_alias_refuses_diffusers_arguments(args, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(TypeError, match="diffusers"):
            groupnorm.AdaGroupNorm(*args, **kwargs)
