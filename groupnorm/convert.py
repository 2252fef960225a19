"""``convert`` / ``revert``: swap torch.nn.GroupNorm modules for ours in a model, and back.

Modelled on torchao's ``quantize_(model, config, filter_fn)``: the model is changed in place
and returned; ``filter_fn(module, fqn)`` picks which modules are swapped. Swapped modules
share the original Parameter objects, so optimizers, tied weights, device, dtype,
requires_grad, training mode, hooks and state_dict keys all stay as they were.

``fuse=True`` also folds the activation (and scale/shift) after a GroupNorm into it, where
the order of calls is known: adjacent entries of an ``nn.Sequential``, and the diffusers
blocks that ``groupnorm.diffusers_fusion`` has an adapter for. Other code in a ``forward``
(``h = self.norm(h); h = self.act(h)``) is not visible to a module walk; see docs/fusion.md
and docs/compatibility.md.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import sys
from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn

from .modules import GroupNorm

FilterFn = Callable[[nn.Module, str], bool]

# Activation modules that ``revert`` puts back after a GroupNorm with a fused activation.
_ACTIVATION_MODULES: Dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "mish": nn.Mish,
}


class FusedActivation(nn.Identity):
    """Stands where an activation module was before ``convert(fuse=True)`` folded it into the
    GroupNorm in front of it; ``revert`` puts it back here (an exact inverse)."""

    def __init__(self, activation: str = "silu", inplace: bool = False,
                 original: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.activation = activation
        self.inplace = inplace
        # Kept outside _modules: no state_dict entry, no extra module in named_modules().
        self.__dict__["original"] = original

    def restore(self) -> nn.Module:
        """The activation module that stood here (the same object when it was recorded)."""
        if self.__dict__.get("original") is not None:
            return self.__dict__["original"]
        act = _ACTIVATION_MODULES[self.activation]()
        if hasattr(act, "inplace"):
            act.inplace = self.inplace
        return act

    def extra_repr(self) -> str:
        return f"fused {self.activation!r} into the previous module"


# --- convert --------------------------------------------------------------------------

def _is_torch_group_norm(module: nn.Module) -> bool:
    # Ours are skipped; a subclass with its own forward (e.g. one that upcasts first) is left
    # alone, since swapping it would drop that forward.
    return (isinstance(module, nn.GroupNorm) and not isinstance(module, GroupNorm)
            and type(module).forward is nn.GroupNorm.forward)


def _accepts(filter_fn: Optional[FilterFn], module: nn.Module, fqn: str) -> bool:
    return filter_fn is None or bool(filter_fn(module, fqn))


def _swap_children(model: nn.Module, make, wanted, filter_fn: Optional[FilterFn]) -> List[str]:
    # One replacement per original module, so a module registered in two places stays shared.
    # Returns the fqns of the modules replaced (each once).
    done: Dict[int, nn.Module] = {}
    swapped: List[str] = []
    for parent_fqn, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            fqn = f"{parent_fqn}.{name}" if parent_fqn else name
            if id(child) in done:
                setattr(parent, name, done[id(child)])
            elif wanted(child) and _accepts(filter_fn, child, fqn):
                done[id(child)] = make(child)
                setattr(parent, name, done[id(child)])
                swapped.append(fqn)
    return swapped


@dataclass
class ConvertReport:
    """What ``convert(..., report=True)`` did: the qualified names of the norms that now
    run with a fused activation or scale/shift, and of those only swapped for ours."""

    fused: List[str] = field(default_factory=list)
    swapped: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"groupnorm.convert: {len(self.fused)} norms fused, {len(self.swapped)} swapped without fusion"


def _holds_diffusers(model: nn.Module) -> bool:
    # Checked before importing the adapters (and so diffusers): a model built from diffusers
    # classes has already imported it.
    return "diffusers" in sys.modules and any(
        type(m).__module__.startswith("diffusers.") for m in model.modules())


def convert(model: nn.Module, *, fuse: bool = False, filter_fn: Optional[FilterFn] = None,
            report: bool = False):
    """Replace every torch.nn.GroupNorm in ``model`` by ``groupnorm.GroupNorm``, in place.

    Returns ``model`` (or the new module when ``model`` itself is a torch.nn.GroupNorm);
    with ``report=True``, ``(model, ConvertReport)`` naming the norms fused and swapped.
    ``filter_fn(module, fqn) -> bool`` chooses the modules to swap (and, with ``fuse``, to
    fuse; it also sees diffusers' AdaGroupNorm modules then).

    ``fuse=True`` (default False) runs the activation, and a per-sample scale/shift, in the
    norm's own call: an ``nn.SiLU`` right after a GroupNorm in an ``nn.Sequential`` (its slot
    gets a ``FusedActivation`` identity), and the diffusers blocks listed in docs/fusion.md
    (ResnetBlock2D, the VAE's and UNets' ``conv_norm_out -> conv_act``, AdaGroupNorm,
    ResnetBlockCondNorm2D), each recognised by class and configuration. A fused norm
    returns the *activated* output: a forward hook registered on it later, or an
    ``nn.Sequential`` slice ending at it, sees post-activation values. Norms or activations
    that already carry hooks are not fused.
    """
    if _is_torch_group_norm(model):
        new = GroupNorm.from_torch(model) if _accepts(filter_fn, model, "") else model
        return (new, ConvertReport(swapped=[""] if new is not model else [])) if report else new
    fused: List[str] = []
    if fuse and _holds_diffusers(model):
        from .diffusers_fusion import fuse_blocks

        fused += fuse_blocks(model, lambda m, fqn: _accepts(filter_fn, m, fqn))
    swapped = _swap_children(model, GroupNorm.from_torch, _is_torch_group_norm, filter_fn)
    if fuse:
        in_sequence = _fuse_sequential_silu(model, filter_fn)
        fused += in_sequence
        swapped = [fqn for fqn in swapped if fqn not in set(in_sequence)]
    return (model, ConvertReport(fused, swapped)) if report else model


def _has_hooks(module: nn.Module) -> bool:
    # A hook would observe (or change) the tensor between the two modules, which fusion removes.
    return any(getattr(module, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _fusable(norm: nn.Module, act: nn.Module, uses: Dict[int, int]) -> bool:
    return (type(norm) is GroupNorm and norm.activation == "none" and norm.process_group is None
            and type(act) is nn.SiLU
            # A module used in two places would carry the SiLU to the other place too.
            and uses[id(norm)] == 1 and uses[id(act)] == 1
            and not _has_hooks(norm) and not _has_hooks(act))


def _fuse_sequential_silu(model: nn.Module, filter_fn: Optional[FilterFn]) -> List[str]:
    fused: List[str] = []
    uses: Dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    for seq_fqn, seq in model.named_modules():
        if type(seq) is not nn.Sequential:  # a subclass may run its children in another order
            continue
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            norm, act = seq._modules[first], seq._modules[second]
            fqn = f"{seq_fqn}.{first}" if seq_fqn else first
            if norm is None or act is None or not _fusable(norm, act, uses):
                continue
            if not _accepts(filter_fn, norm, fqn):
                continue
            norm.activation = "silu"
            setattr(seq, second, FusedActivation("silu", inplace=act.inplace, original=act))
            fused.append(fqn)
    return fused


# --- revert ---------------------------------------------------------------------------

def to_torch_group_norm(module: GroupNorm) -> nn.GroupNorm:
    """A plain torch.nn.GroupNorm sharing ``module``'s parameters, buffers, mode and hooks."""
    if module.process_group is not None:
        raise ValueError("revert: a GroupNorm with a process_group has no torch.nn equivalent "
                         "(its statistics span several devices)")
    new = nn.GroupNorm.__new__(nn.GroupNorm)
    nn.Module.__init__(new)
    extras = ("activation", "process_group")
    new.__dict__.update({k: v for k, v in module.__dict__.items() if k not in extras})
    return new


def _is_ours(module: nn.Module) -> bool:
    # Subclasses with another forward (per-call scale/shift) have no module-level torch twin.
    return isinstance(module, GroupNorm) and type(module).forward is GroupNorm.forward


def _reverted(module: GroupNorm) -> nn.Module:
    # A fused activation that no FusedActivation slot takes back comes out as an explicit pair.
    plain = to_torch_group_norm(module)
    if module.activation == "none":
        return plain
    return nn.Sequential(plain, _ACTIVATION_MODULES[module.activation]())


def _restore_fused_slots(model: nn.Module) -> None:
    # Exact inverse of fuse: the SiLU goes back into the slot after its GroupNorm.
    for _, seq in model.named_modules():
        if type(seq) is not nn.Sequential:
            continue
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            norm, slot = seq._modules[first], seq._modules[second]
            if (_is_ours(norm) and isinstance(slot, FusedActivation)
                    and norm.activation == slot.activation):
                setattr(seq, first, to_torch_group_norm(norm))
                setattr(seq, second, slot.restore())


def revert(model: nn.Module) -> nn.Module:
    """Give torch.nn.GroupNorm modules back, in place, e.g. for exporters that do not know
    groupnorm's ops. Parameters stay shared. A SiLU fused by ``convert(fuse=True)`` returns
    to its ``nn.Sequential`` slot; any other fused activation becomes
    ``nn.Sequential(torch.nn.GroupNorm, activation)`` (whose state_dict keys gain a ``.0``).
    Diffusers blocks fused by ``convert`` get their classes, norms and activation modules back.
    Returns ``model`` (or the new module when ``model`` itself is one of ours)."""
    if "groupnorm.diffusers_fusion" in sys.modules:   # loaded by a convert that fused one
        sys.modules["groupnorm.diffusers_fusion"].unfuse_blocks(model)
    if _is_ours(model):
        return _reverted(model)
    _restore_fused_slots(model)
    _swap_children(model, _reverted, _is_ours, None)
    return model


__all__ = ["convert", "revert", "ConvertReport", "FusedActivation", "to_torch_group_norm"]
