"""``convert`` / ``revert``: swap torch.nn.GroupNorm modules for ours in a model, and back.

Modelled on torchao's ``quantize_(model, config, filter_fn)``: the model is changed in place
and returned; ``filter_fn(module, fqn)`` picks which modules are swapped. Swapped modules
share the original Parameter objects, so optimizers, tied weights, device, dtype,
requires_grad, training mode, hooks and state_dict keys all stay as they were.

``fuse=True`` also folds a SiLU into the GroupNorm before it, but only where the order of
calls is visible from the structure alone: adjacent entries of an ``nn.Sequential``. Code in
a ``forward`` (``h = self.norm(h); h = self.act(h)``) is not visible to a module walk; see
docs/compatibility.md for everything convert cannot see.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

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
    """Stands where an ``nn.SiLU`` was before ``convert(fuse=True)`` folded it into the
    GroupNorm in front of it; ``revert`` puts the SiLU back here (an exact inverse)."""

    def __init__(self, activation: str = "silu", inplace: bool = False) -> None:
        super().__init__()
        self.activation = activation
        self.inplace = inplace

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


def _swap_children(model: nn.Module, make, wanted, filter_fn: Optional[FilterFn]) -> None:
    # One replacement per original module, so a module registered in two places stays shared.
    done: Dict[int, nn.Module] = {}
    for parent_fqn, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            fqn = f"{parent_fqn}.{name}" if parent_fqn else name
            if id(child) in done:
                setattr(parent, name, done[id(child)])
            elif wanted(child) and _accepts(filter_fn, child, fqn):
                done[id(child)] = make(child)
                setattr(parent, name, done[id(child)])


def convert(model: nn.Module, *, fuse: bool = False, filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Replace every torch.nn.GroupNorm in ``model`` by ``groupnorm.GroupNorm``, in place.

    Returns ``model`` (or the new module when ``model`` itself is a torch.nn.GroupNorm).
    ``filter_fn(module, fqn) -> bool`` chooses the modules to swap (and, with ``fuse``, to fuse).
    ``fuse=True`` folds an ``nn.SiLU`` that directly follows a GroupNorm in an ``nn.Sequential``
    into it (``activation="silu"``), leaving a ``FusedActivation`` identity in its slot.
    """
    if _is_torch_group_norm(model):
        return GroupNorm.from_torch(model) if _accepts(filter_fn, model, "") else model
    _swap_children(model, GroupNorm.from_torch, _is_torch_group_norm, filter_fn)
    if fuse:
        _fuse_sequential_silu(model, filter_fn)
    return model


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


def _fuse_sequential_silu(model: nn.Module, filter_fn: Optional[FilterFn]) -> None:
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
            setattr(seq, second, FusedActivation("silu", inplace=act.inplace))


# --- revert ---------------------------------------------------------------------------

def _to_torch(module: GroupNorm) -> nn.GroupNorm:
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
    plain = _to_torch(module)
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
                setattr(seq, first, _to_torch(norm))
                setattr(seq, second, nn.SiLU(inplace=slot.inplace))


def revert(model: nn.Module) -> nn.Module:
    """Give torch.nn.GroupNorm modules back, in place, e.g. for exporters that do not know
    groupnorm's ops. Parameters stay shared. A SiLU fused by ``convert(fuse=True)`` returns
    to its ``nn.Sequential`` slot; any other fused activation becomes
    ``nn.Sequential(torch.nn.GroupNorm, activation)`` (whose state_dict keys gain a ``.0``).
    Returns ``model`` (or the new module when ``model`` itself is one of ours)."""
    if _is_ours(model):
        return _reverted(model)
    _restore_fused_slots(model)
    _swap_children(model, _reverted, _is_ours, None)
    return model


__all__ = ["convert", "revert", "FusedActivation"]
