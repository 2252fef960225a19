"""convert / revert: module swaps that keep everything a model's owner relies on, and exact
outputs and gradients on diffusers models built from small random configs."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import groupnorm
from groupnorm import GroupNorm, convert, revert
from groupnorm.convert import FusedActivation


def _input(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (-2.3 + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)


def _randomize_affine(model):
    # Fresh modules have weight 1 and bias 0, which would hide a swapped weight and bias.
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm) and m.affine:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen, dtype=torch.float64))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen, dtype=torch.float64))
    return model


class Block(nn.Module):
    """norm -> act in forward code (what fusion cannot see), plus a Sequential head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(4, 8)
        self.act = nn.SiLU()
        self.head = nn.Sequential(nn.Conv2d(8, 8, 1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x):
        return self.head(self.act(self.norm(self.conv(x))))


def _torch_norms(model):
    return [n for n, m in model.named_modules() if type(m) is nn.GroupNorm]


def _ours(model):
    return [n for n, m in model.named_modules() if isinstance(m, GroupNorm)]


# --- convert keeps what the owner relies on --------------------------------------------

def test_convert_replaces_in_place_and_shares_parameters():
    model = _randomize_affine(Block())
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    out = convert(model)
    assert out is model
    assert _torch_norms(model) == [] and _ours(model) == ["norm", "head.1"]
    assert all(p is params[n] for n, p in model.named_parameters())  # optimizers keep working
    assert list(model.state_dict()) == keys


def test_convert_matches_torch_outputs_and_grads():
    ref = _randomize_affine(Block())
    model = convert(copy.deepcopy(ref), fuse=True)
    x = _input((2, 3, 6, 7))
    dy = _input((2, 4, 6, 7), seed=1)
    (ref(x) * dy).sum().backward()
    (model(x) * dy).sum().backward()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        # float32 sums over 2 * 6 * 7 positions, in another order than torch's kernel.
        err = ((p.grad - q.grad).abs().max() / q.grad.abs().max()).item()
        assert err < 1e-5, (name, err)


def test_convert_keeps_training_flag_requires_grad_dtype_and_device():
    model = _randomize_affine(Block()).double()
    model.norm.eval()
    model.head[1].weight.requires_grad_(False)
    convert(model)
    assert model.training and not model.norm.training and model.head[1].training
    assert not model.head[1].weight.requires_grad and model.head[1].bias.requires_grad
    assert model.norm.weight.dtype == torch.float64 and model.norm.weight.device.type == "cpu"
    assert model.norm.eps == 1e-5 and model.norm.num_groups == 4


def test_convert_keeps_hooks():
    model = Block()
    seen = []
    model.norm.register_forward_hook(lambda m, i, o: seen.append(type(m)))
    convert(model)
    model(_input((1, 3, 4, 4)))
    assert seen == [GroupNorm]


def test_convert_root_module_and_already_converted():
    norm = _randomize_affine(nn.GroupNorm(2, 4))
    new = convert(norm)
    assert type(new) is GroupNorm and new.weight is norm.weight
    assert convert(new) is new
    x = _input((2, 4, 3, 3))
    torch.testing.assert_close(new(x), norm(x))


def test_convert_shared_module_stays_shared():
    norm = nn.GroupNorm(2, 4)
    model = nn.Sequential(nn.Sequential(norm), nn.ModuleList([norm]))
    convert(model)
    assert model[0][0] is model[1][0] and type(model[0][0]) is GroupNorm


def test_convert_filter_fn_gets_module_and_fqn():
    model = Block()
    calls = []

    def only_head(module, fqn):
        calls.append((type(module), fqn))
        return fqn.startswith("head.")

    convert(model, filter_fn=only_head)
    assert calls == [(nn.GroupNorm, "norm"), (nn.GroupNorm, "head.1")]
    assert type(model.norm) is nn.GroupNorm and type(model.head[1]) is GroupNorm


def test_convert_leaves_subclasses_with_their_own_forward():
    class Upcasting(nn.GroupNorm):
        def forward(self, x):
            return super().forward(x.float()).type(x.dtype)

    class Plain(nn.GroupNorm):
        pass

    model = nn.Sequential(Upcasting(2, 4), Plain(2, 4))
    convert(model)
    assert type(model[0]) is Upcasting and type(model[1]) is GroupNorm


# --- fuse ------------------------------------------------------------------------------

def test_fuse_only_sequential_pairs():
    model = convert(Block(), fuse=True)
    assert model.norm.activation == "none" and type(model.act) is nn.SiLU  # forward code: unseen
    assert model.head[1].activation == "silu" and isinstance(model.head[2], FusedActivation)
    assert isinstance(model.head[2], nn.Identity)


@pytest.mark.parametrize("why", ["shared_norm", "shared_act", "hook", "subclass", "gelu"])
def test_fuse_skips_unsafe_pairs(why):
    norm, act = nn.GroupNorm(2, 4), nn.SiLU()
    seq_type = nn.Sequential
    if why == "subclass":
        class Reversed(nn.Sequential):
            def forward(self, x):
                for m in reversed(self):
                    x = m(x)
                return x
        seq_type = Reversed
    if why == "gelu":
        act = nn.GELU()
    model = nn.Sequential(seq_type(norm, act))
    if why == "shared_norm":
        model.append(norm)
    if why == "shared_act":
        model.append(act)
    if why == "hook":
        norm.register_forward_hook(lambda m, i, o: None)
    convert(model, fuse=True)
    assert model[0][0].activation == "none" and model[0][1] is act


def test_fuse_respects_filter_fn():
    model = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU(), nn.GroupNorm(2, 4), nn.SiLU())
    convert(model, fuse=True, filter_fn=lambda m, fqn: fqn != "2")
    assert model[0].activation == "silu" and type(model[2]) is nn.GroupNorm and type(model[3]) is nn.SiLU


# --- revert ----------------------------------------------------------------------------

def test_revert_is_exact_inverse_of_fuse():
    model = _randomize_affine(Block())
    model.head[2] = nn.SiLU(inplace=True)
    params = dict(model.named_parameters())
    before = repr(model)
    ref = copy.deepcopy(model)
    out = revert(convert(model, fuse=True))
    assert out is model and repr(model) == before
    assert all(p is params[n] for n, p in model.named_parameters())
    x = _input((2, 3, 5, 5))
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_revert_unfused_activation_becomes_explicit_pair():
    norm = GroupNorm(2, 4, activation="gelu")
    _randomize_affine(norm)
    pair = revert(norm)
    assert type(pair[0]) is nn.GroupNorm and type(pair[1]) is nn.GELU and pair[0].weight is norm.weight
    x = _input((2, 4, 3, 3))
    torch.testing.assert_close(pair(x), norm(x))
    assert type(revert(GroupNorm(2, 4))) is nn.GroupNorm


def test_revert_refuses_process_group():
    model = nn.Sequential(GroupNorm(2, 4))
    model[0].process_group = object()
    with pytest.raises(ValueError, match="process_group"):
        revert(model)


def test_lazy_public_names():
    assert groupnorm.convert is convert and groupnorm.revert is revert


# --- diffusers models --------------------------------------------------------------------

def _unet():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def _vae():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=16, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def _run(model, kind, x):
    if kind == "unet":
        return model(x, torch.tensor([3, 511]), return_dict=False)[0]
    return model(x, return_dict=False)[0]


# float64: both sides are exact to rounding; float32: torch's own CPU kernel rounds differently.
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["unet", "vae"])
def test_diffusers_outputs_and_gradients_match(kind, dtype):
    torch.manual_seed(0)
    ref = _randomize_affine((_unet if kind == "unet" else _vae)()).to(dtype)
    n_norms = len(_torch_norms(ref))
    model = convert(copy.deepcopy(ref), fuse=True)
    assert len(_ours(model)) == n_norms > 0 and _torch_norms(model) == []
    x = _input((2, 3, 16, 16), dtype)
    outs = []
    for m in (ref, model):
        y = _run(m, kind, x)
        (y * _input(y.shape, dtype, seed=1)).sum().backward()
        outs.append(y.detach())
    torch.testing.assert_close(outs[1], outs[0], **TOL[dtype])
    grads = dict(ref.named_parameters())
    # Absolute slack scaled to the model's largest gradient: some gradients are zero in exact
    # arithmetic (attention's key bias: softmax ignores a shift shared by all keys) and hold
    # only rounding noise, on both sides.
    big = max(q.grad.abs().max() for q in grads.values() if q.grad is not None)
    for name, p in model.named_parameters():
        q = grads[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=TOL[dtype]["rtol"],
                                       atol=TOL[dtype]["atol"] * big, msg=name)
    revert(model)
    assert len(_torch_norms(model)) == n_norms and _ours(model) == []
    torch.testing.assert_close(_run(model, kind, x).detach(), outs[0], **TOL[dtype])
