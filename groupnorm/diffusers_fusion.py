"""Fusion adapters for diffusers' building blocks, used by ``convert(model, fuse=True)``.

Real models call the norm and the activation in ``forward`` code (``h = self.norm1(h);
h = self.nonlinearity(h)``), which a module walk cannot see. Each adapter here knows one
diffusers class's forward (checked against diffusers 0.42) and fuses only after checking
the instance's configuration: the exact class (a subclass may have its own forward), a
supported activation module, plain norms, no hooks on what fusion removes, no module used
twice. Anything else is left to the ordinary swap.

Two kinds of adapter:

- ``NormActSlots``: the activation module runs only right after the listed norms, so the
  norms take the activation and the activation's slot gets a ``FusedActivation`` identity.
  No forward changes (VAE Encoder/Decoder, UNet2DModel, UNet2DConditionModel,
  ResnetBlockCondNorm2D with "ada_group").
- ``ResnetBlock2DAdapter``: the block's ``nonlinearity`` also acts on the time embedding, and
  "scale_shift" modulates between norm2 and the activation, so the block's class is switched
  to ``FusedResnetBlock2D`` (same forward, fused calls); ``revert`` switches it back.

diffusers' ``AdaGroupNorm`` becomes ``FusedAdaGroupNorm`` (its group norm and scale/shift in
one call). This module imports diffusers; ``convert`` imports it only for models that hold
diffusers modules.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.normalization import AdaGroupNorm
from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.utils import deprecate

from .fused_modules import GroupNormScaleShift
from .functional import group_norm
from .modules import GroupNorm

Tensor = torch.Tensor
Accept = Callable[[nn.Module, str], bool]


# --- what fusion may touch ---------------------------------------------------------------

def activation_of(module: nn.Module) -> Optional[str]:
    """The fused-epilogue name of an activation module, or None when it has no fused twin
    (exact classes only: a subclass may compute something else)."""
    kind = type(module)
    if kind is nn.SiLU:
        return "silu"
    if kind is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    if kind is nn.ReLU:
        return "relu"
    if kind is nn.Mish:
        return "mish"
    return None


def has_hooks(module: nn.Module) -> bool:
    """A hook would observe (or change) a tensor that fusion no longer produces."""
    return any(getattr(module, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def plain_norm(module: nn.Module) -> bool:
    """torch's GroupNorm (or a subclass keeping its forward), or ours not yet fused."""
    if type(module) is GroupNorm:
        return module.activation == "none" and module.process_group is None
    return (isinstance(module, nn.GroupNorm) and not isinstance(module, GroupNorm)
            and type(module).forward is nn.GroupNorm.forward)


class Context:
    """What every adapter asks: how often each module is registered, and the user's filter."""

    def __init__(self, model: nn.Module, accept: Accept) -> None:
        self.uses: Dict[int, int] = {}
        for _, m in model.named_modules(remove_duplicate=False):
            self.uses[id(m)] = self.uses.get(id(m), 0) + 1
        self.accept = accept

    def norm_ok(self, norm: nn.Module, fqn: str) -> bool:
        return self.uses.get(id(norm), 0) == 1 and not has_hooks(norm) and self.accept(norm, fqn)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# --- diffusers' AdaGroupNorm -----------------------------------------------------------

class FusedAdaGroupNorm(AdaGroupNorm):
    """diffusers' AdaGroupNorm with its group norm, ``* (1 + scale) + shift`` (and, inside a
    fused ResnetBlockCondNorm2D, the activation after it) in one call. Same parameters and
    state_dict; made by ``convert(model, fuse=True)``, undone by ``revert``."""

    activation = "none"

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.act:
            emb = self.act(emb)
        emb = self.linear(emb)
        if x.dim() == 4 and emb.dim() == 2 and emb.dtype == x.dtype and emb.shape[0] == x.shape[0]:
            scale, shift = emb.chunk(2, dim=1)
            return group_norm(x, self.num_groups, None, None, self.eps, activation=self.activation,
                              scale=scale, shift=shift)
        # Shapes or dtypes the fused call would treat differently (broadcasting, promotion):
        # diffusers' own arithmetic.
        scale, shift = emb[:, :, None, None].chunk(2, dim=1)
        x = torch.nn.functional.group_norm(x, self.num_groups, eps=self.eps)
        x = x * (1 + scale) + shift
        return _ACT_FUNCTIONS[self.activation](x)


_ACT_FUNCTIONS = {
    "none": lambda t: t,
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
    "relu": torch.nn.functional.relu,
    "mish": torch.nn.functional.mish,
}


def _fuse_ada(norm: AdaGroupNorm, activation: str) -> None:
    norm.__class__ = FusedAdaGroupNorm
    if activation != "none":
        norm.activation = activation


def _unfuse_ada(norm: FusedAdaGroupNorm) -> None:
    norm.__dict__.pop("activation", None)
    norm.__class__ = AdaGroupNorm


class AdaGroupNormAdapter:
    """A stand-alone diffusers AdaGroupNorm: its output is unchanged by fusion, so hooks on
    it and shared uses are fine."""

    classes = (AdaGroupNorm,)

    def fuse(self, block: nn.Module, fqn: str, ctx: Context) -> List[str]:
        if not ctx.accept(block, fqn):
            return []
        _fuse_ada(block, "none")
        return [fqn]

    def unfuse(self, block: nn.Module) -> None:
        if type(block) is FusedAdaGroupNorm:
            _unfuse_ada(block)


# --- norm modules followed by an activation module used nowhere else ------------------------

def _norm_fusable(norm: nn.Module) -> bool:
    return plain_norm(norm) or type(norm) is AdaGroupNorm


def _fused_norm(norm: nn.Module, activation: str) -> nn.Module:
    if type(norm) is AdaGroupNorm:
        _fuse_ada(norm, activation)
        return norm
    return GroupNorm.from_torch(norm, activation=activation)


def _to_torch_norm(norm: nn.Module) -> nn.Module:
    from .convert import to_torch_group_norm

    if type(norm) is FusedAdaGroupNorm:
        _unfuse_ada(norm)
        return norm
    return to_torch_group_norm(norm)


class NormActSlots:
    """Blocks whose forward calls ``act`` only right after the ``norms`` (each of them):
    the norms take the activation, ``act``'s slot gets a FusedActivation identity."""

    def __init__(self, classes: Tuple[type, ...], norms: Tuple[str, ...], act: str,
                 when: Callable[[nn.Module], bool] = lambda block: True) -> None:
        self.classes, self.norms, self.act, self.when = classes, norms, act, when

    def fuse(self, block: nn.Module, fqn: str, ctx: Context) -> List[str]:
        from .convert import FusedActivation

        act = getattr(block, self.act, None)
        norms = [getattr(block, name, None) for name in self.norms]
        name = activation_of(act) if act is not None else None
        if (name is None or has_hooks(act) or ctx.uses.get(id(act), 0) != 1 or not self.when(block)
                or not all(n is not None and _norm_fusable(n) and ctx.norm_ok(n, _join(fqn, a))
                           for n, a in zip(norms, self.norms))):
            return []
        for attr, norm in zip(self.norms, norms):
            setattr(block, attr, _fused_norm(norm, name))
        setattr(block, self.act, FusedActivation(name, inplace=getattr(act, "inplace", False), original=act))
        return [_join(fqn, a) for a in self.norms]

    def unfuse(self, block: nn.Module) -> None:
        from .convert import FusedActivation

        slot = getattr(block, self.act, None)
        if not isinstance(slot, FusedActivation):
            return
        norms = [getattr(block, name) for name in self.norms]
        if not all(getattr(n, "activation", None) == slot.activation for n in norms):
            return
        for attr, norm in zip(self.norms, norms):
            setattr(block, attr, _to_torch_norm(norm))
        setattr(block, self.act, slot.restore())


# --- ResnetBlock2D -------------------------------------------------------------------------

class FusedResnetBlock2D(ResnetBlock2D):
    """diffusers' ResnetBlock2D forward (0.42) with norm1 -> act and norm2 -> [time scale/shift]
    -> act as single fused calls: ``norm1``/``norm2`` carry the activation (and norm2, for
    "scale_shift", the modulation). ``nonlinearity`` still acts on the time embedding."""

    def forward(self, input_tensor: Tensor, temb: Tensor, *args, **kwargs) -> Tensor:
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            deprecate("scale", "1.0.0", "The `scale` argument is deprecated and will be ignored. Please "
                      "remove it, as passing it will raise an error in the future.")
        hidden_states = self.norm1(input_tensor)   # activation fused
        if self.upsample is not None:
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)
        hidden_states = self.conv1(hidden_states)
        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        if self.time_embedding_norm == "default":
            if temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = self.norm2(hidden_states)   # activation fused
        elif self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden_states = _modulated(self.norm2, hidden_states, time_scale, time_shift)
        else:   # e.g. the VAE decoder's "group", built without a time embedding
            hidden_states = self.norm2(hidden_states)   # activation fused
        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)
        if self.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor


def _per_sample(t: Tensor, x: Tensor) -> Optional[Tensor]:
    # (N, C, 1, 1) in x's dtype -> the (N, C) the fused call takes; None for anything the
    # block's broadcasting arithmetic would treat differently.
    n, c = x.shape[0], x.shape[1]
    if t.dtype != x.dtype or t.dim() != x.dim() or tuple(t.shape[1:]) != (c,) + (1,) * (x.dim() - 2):
        return None
    if t.shape[0] == n:
        return t.flatten(1)
    return t.flatten(1).expand(n, c) if t.shape[0] == 1 else None


def _modulated(norm: GroupNormScaleShift, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """act(norm(x) * (1 + scale) + shift) as one call, or as diffusers writes it when the
    per-sample tensors do not have the fused call's shape or dtype."""
    s, t = _per_sample(scale, x), _per_sample(shift, x)
    if s is not None and t is not None:
        return norm(x, s, t)
    y = group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return _ACT_FUNCTIONS[norm.activation](y * (1 + scale) + shift)


class ResnetBlock2DAdapter:
    """ResnetBlock2D, any time_embedding_norm its constructor accepts ("default",
    "scale_shift", or another name when built without a time embedding, as the VAE decoder's
    "group"): the fused forward keeps all three branches of the stock one."""

    classes = (ResnetBlock2D,)

    def fuse(self, block: nn.Module, fqn: str, ctx: Context) -> List[str]:
        name = activation_of(block.nonlinearity)
        if (name is None or has_hooks(block.nonlinearity)
                or not all(plain_norm(n) and ctx.norm_ok(n, _join(fqn, a))
                           for n, a in ((block.norm1, "norm1"), (block.norm2, "norm2")))):
            return []
        norm2 = GroupNormScaleShift if block.time_embedding_norm == "scale_shift" else GroupNorm
        block.norm1 = GroupNorm.from_torch(block.norm1, activation=name)
        block.norm2 = norm2.from_torch(block.norm2, activation=name)
        block.__class__ = FusedResnetBlock2D
        return [_join(fqn, "norm1"), _join(fqn, "norm2")]

    def unfuse(self, block: nn.Module) -> None:
        if type(block) is not FusedResnetBlock2D:
            return
        from .convert import to_torch_group_norm

        block.norm1 = to_torch_group_norm(block.norm1)
        block.norm2 = to_torch_group_norm(block.norm2)
        block.__class__ = ResnetBlock2D


# --- the table convert walks --------------------------------------------------------------

ADAPTERS = (
    ResnetBlock2DAdapter(),
    NormActSlots((Encoder, Decoder, UNet2DModel, UNet2DConditionModel), ("conv_norm_out",), "conv_act"),
    NormActSlots((ResnetBlockCondNorm2D,), ("norm1", "norm2"), "nonlinearity",
                 when=lambda block: block.time_embedding_norm == "ada_group"),
    AdaGroupNormAdapter(),
)
_BY_CLASS = {cls: adapter for adapter in ADAPTERS for cls in adapter.classes}
_FUSED_CLASSES = {FusedResnetBlock2D: ResnetBlock2D, FusedAdaGroupNorm: AdaGroupNorm}


def fuse_blocks(model: nn.Module, accept: Accept) -> List[str]:
    """Fuse every recognised block of ``model`` in place -> the fqns of the norms fused.
    Blocks come before their children (named_modules order), so an AdaGroupNorm inside a
    ResnetBlockCondNorm2D gets its activation from the block's adapter."""
    ctx = Context(model, accept)
    fused: List[str] = []
    for fqn, block in list(model.named_modules()):
        adapter = _BY_CLASS.get(type(block))   # exact class: subclasses keep their forward
        if adapter is not None:
            fused += adapter.fuse(block, fqn, ctx)
    return fused


def unfuse_blocks(model: nn.Module) -> None:
    """Undo ``fuse_blocks`` in place: classes, norms and activation modules as they were
    (norms as torch.nn.GroupNorm sharing the parameters)."""
    for _, block in list(model.named_modules()):
        adapter = _BY_CLASS.get(_FUSED_CLASSES.get(type(block), type(block)))
        if adapter is not None:
            adapter.unfuse(block)
