"""torch.compile sees the Triton kernels of ``groupnorm::forward`` and ``groupnorm::backward``
on CUDA tensors, and launches them itself.

A ``custom_op`` is opaque to torch.compile: Inductor calls it through Python, where each
of our launches costs host time, and ``mode="reduce-overhead"`` cannot see inside it.
``torch.library.triton_op`` solves this for an op whose whole body is Triton kernels, by
a rule that decomposes the op while AOTAutograd functionalises the graph. Our ops also
run Numba on CPU, so the same kind of rule is registered here on the existing ops (same
names, schemas, fake impls, autograd and autocast rules), and it decomposes only calls
on CUDA tensors that the Triton backend runs: there the op's Python implementation runs
with every launcher in ``direct.traced`` mode, so each kernel launch becomes a
``wrap_triton`` node that Inductor compiles and launches with its own launcher (CUDA
graphs included). CPU tensors, other backends, tensor subclasses and ``torch.export``
(which keeps custom ops whole unless asked otherwise) keep the opaque op.

Plans need plain ints: a traced call specialises on x's shape (a dynamic-shape graph
recompiles per shape on CUDA, as the kernels' block sizes depend on it).
"""
from __future__ import annotations

import torch

_REGISTERED = False


def _decomposition_disabled() -> bool:
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:   # an older torch: no switch, export keeps the op whole
        return False
    return custom_triton_ops_decomposition_disabled()


def _plain_types(types) -> bool:
    from torch._subclasses import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return all(issubclass(t, FakeTensor) or t in (torch.Tensor, FunctionalTensor) for t in types)


def _triton_runs(x) -> bool:
    """x is a CUDA tensor and the Triton backend is the one that runs it."""
    if not isinstance(x, torch.Tensor) or not x.is_cuda:
        return False
    from .backends import registry

    return registry.backend_name("cuda") == "triton"


def _rule(impl, x_index: int):
    """A FunctionalTensorMode rule running ``impl`` traced where Triton runs x."""

    def rule(mode, op, types, args, kwargs):
        if _decomposition_disabled() or not _plain_types(types) or not _triton_runs(args[x_index]):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        from .backends.triton_gpu import direct

        _note_kernels()
        with mode, direct.traced():
            return impl(*args, **(kwargs or {}))

    return rule


def _note_kernels() -> None:
    """Tell AOTAutograd's cache which Triton kernels the two ops run (their sources are
    then part of its key, as for a triton_op)."""
    table = getattr(getattr(torch._library, "triton", None), "triton_ops_to_kernels", None)
    if table is None or "groupnorm::forward" in table:
        return
    from .backends.triton_gpu import launch

    kernels = [k.kernel for k in launch.LAUNCHERS]
    for name in ("groupnorm::forward", "groupnorm::backward"):
        table[name] = kernels


def register() -> None:
    """Register the rules once (ops.py calls this at import)."""
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        from torch._subclasses.functional_tensor import FunctionalTensorMode
    except ImportError:   # pragma: no cover - a torch without it compiles the opaque ops
        return
    from . import ops

    ops.forward.register_torch_dispatch(FunctionalTensorMode, _rule(ops.forward_impl, 0))
    ops.backward.register_torch_dispatch(FunctionalTensorMode, _rule(ops.backward_impl, 1))
    _REGISTERED = True
