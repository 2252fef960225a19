"""A torch.compile graph pass that fuses what follows ``groupnorm::forward`` into it.

Under torch.compile our norm is one opaque op, so Inductor cannot fuse the activation after
it (as it does for the stock GroupNorm it decomposes). This pass rewrites, in the graph
Dynamo captured (before autograd, so training graphs get the fused op's own backward)::

    y = groupnorm::forward(x, w, b, None, None, G, eps, "none")[0]
    y = y * (1 + scale) + shift        # optional; scale/shift (N, C, 1, ..., 1) in y's dtype
    y = act(y)                         # optional; silu, gelu, gelu-tanh, relu or mish

into ``groupnorm::forward(x, w, b, scale.flatten(1), shift.flatten(1), G, eps, act)[0]``.
It only fuses when every intermediate has that single use, the shapes and dtypes mean the
same arithmetic (no broadcasting beyond per-sample, no type promotion), and the op's
statistics outputs are unused; any other graph is left as it was.

Small CPU inputs go the other way: under torch.compile each call of our op costs tens of
microseconds of custom-op dispatch (forward and backward), while Inductor generates one
loop for its own group norm and what follows. Below ``SMALL_CPU_ELEMENTS`` input elements
the whole chain (fused or not) is written as ``F.group_norm`` -> modulation -> activation for
Inductor to fuse. Measured on 2026-12-07 (docs/fusion.md): at 131k-262k elements Inductor's
loop is 1.2-1.4x faster than our op, at 655k ours is as fast (forward) or 1.26x faster
(forward+backward). CUDA inputs always keep our op.

On by default: the first time torch.compile traces our op (its fake implementation runs),
``auto_enable`` registers the pass, provided Inductor's config is loaded (importing it costs
seconds, too much for ``import groupnorm``). Off with ``groupnorm.compile_fusion.disable()``
or ``GROUPNORM_COMPILE_FUSION=0``; explicitly on for one compile::

    torch.compile(model, options=groupnorm.compile_fusion.options())

It is registered as Inductor's ``pre_grad_custom_pass`` (a ``CustomGraphPass`` with a uuid,
so compiled graphs stay cacheable); other backends than Inductor do not run it.
"""
from __future__ import annotations

import operator
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx

from . import ops  # noqa: F401  (registers torch.ops.groupnorm)

_FORWARD = torch.ops.groupnorm.forward.default
# Statically known CPU inputs with fewer elements go to Inductor's own group norm (0: never).
SMALL_CPU_ELEMENTS = 1 << 19
# groupnorm::forward(x, weight, bias, scale, shift, num_groups, eps, activation)
_SCALE, _SHIFT, _ACT = 3, 4, 7


# --- which nodes are activations ------------------------------------------------------------

def _gelu_name(node: fx.Node) -> Optional[str]:
    approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)


def _plain(name: str) -> Callable[[fx.Node], Optional[str]]:
    # One-argument forms only; F.relu(x, inplace=True) etc. are fine on a fresh output.
    return lambda node: name if len(node.args) == 1 or (len(node.args) == 2 and isinstance(node.args[1], bool)) else None


_ACTIVATION_FUNCTIONS: Dict[Any, Callable[[fx.Node], Optional[str]]] = {
    F.silu: _plain("silu"),
    torch._C._nn.gelu: _gelu_name,
    F.gelu: _gelu_name,
    F.relu: _plain("relu"),
    torch.relu: _plain("relu"),
    F.mish: _plain("mish"),
}
_ACTIVATION_METHODS = {"relu": _plain("relu")}
_TORCH_ACTIVATIONS = {
    "silu": (F.silu, {}),
    "gelu": (F.gelu, {}),
    "gelu_tanh": (F.gelu, {"approximate": "tanh"}),
    "relu": (F.relu, {}),
    "mish": (F.mish, {}),
}


def _activation(node: fx.Node, source: fx.Node) -> Optional[str]:
    """The fused name of ``node`` when it is a supported activation of ``source``."""
    if not node.args or node.args[0] is not source:
        return None
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        return _ACTIVATION_FUNCTIONS[node.target](node)
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS:
        return _ACTIVATION_METHODS[node.target](node)
    return None


# --- the * (1 + scale) + shift modulation ---------------------------------------------------

_ADD = (operator.add, torch.add)
_MUL = (operator.mul, torch.mul)


def _value(node: Any):
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def _other(node: fx.Node, source: Any, ops_: Tuple) -> Optional[Any]:
    """For ``node = op(source, other)`` or ``op(other, source)`` (plain two-argument form),
    the other operand; None otherwise."""
    if node.op != "call_function" or node.target not in ops_ or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if a is source:
        return b
    if b is source:
        return a
    return None


def _per_sample(node: Any, y) -> bool:
    """``node`` is a tensor of shape (N, C, 1, ..., 1) in y's dtype, on y's device."""
    v = _value(node)
    if not isinstance(v, torch.Tensor) or not isinstance(y, torch.Tensor):
        return False
    expected = (y.shape[0], y.shape[1]) + (1,) * (y.dim() - 2)
    return (v.dim() == y.dim() and v.dtype == y.dtype and v.device == y.device
            and all(bool(s == e) for s, e in zip(v.shape, expected)))


def _one_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_one(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 1


def _one_plus(node: fx.Node) -> Optional[Any]:
    """``scale`` when ``node`` is ``1 + scale`` or ``scale + 1``."""
    if node.op != "call_function" or node.target not in _ADD or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    return b if _is_one(a) else a if _is_one(b) else None


def _modulation(y_node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node, List[fx.Node]]]:
    """(scale, shift, [1 + scale, mul, add]) when ``y_node`` feeds exactly
    ``y * (1 + scale) + shift`` and nothing else."""
    y = _value(y_node)
    mul = _one_user(y_node)
    if mul is None:
        return None
    one_plus = _other(mul, y_node, _MUL)
    if not isinstance(one_plus, fx.Node) or len(one_plus.users) != 1:
        return None
    scale = _one_plus(one_plus)
    add = _one_user(mul)
    shift = _other(add, mul, _ADD) if add is not None else None
    if not (_per_sample(scale, y) and _per_sample(one_plus, y) and _per_sample(shift, y)):
        return None
    if not all(isinstance(_value(n), torch.Tensor) and _value(n).shape == y.shape for n in (mul, add)):
        return None
    return scale, shift, [one_plus, mul, add]


# --- the pass ---------------------------------------------------------------------------------

def _output_of(op_node: fx.Node) -> Optional[fx.Node]:
    # y = op(...)[0], with the statistics outputs unused (they would be computed twice).
    users = list(op_node.users)
    if len(users) != 1:
        return None
    y = users[0]
    if y.op == "call_function" and y.target is operator.getitem and y.args == (op_node, 0):
        return y
    return None


def _small_cpu(node: Any, limit: int) -> bool:
    x = _value(node)
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu":
        return False
    numel = x.numel()
    return isinstance(numel, int) and numel < limit


def _composition(graph: fx.Graph, args: List[Any], scale_4d: Any, shift_4d: Any) -> fx.Node:
    """``F.group_norm`` -> ``* (1 + scale) + shift`` -> activation as graph nodes (what the
    stock model hands Inductor)."""
    x, weight, bias, scale, shift, groups, eps, act = args
    index = (slice(None), slice(None)) + (None,) * (_value(x).dim() - 2)
    out = graph.call_function(F.group_norm, (x, groups, weight, bias, eps))
    if scale is not None:
        s = scale_4d if scale_4d is not None else graph.call_function(operator.getitem, (scale, index))
        out = graph.call_function(operator.mul, (out, graph.call_function(operator.add, (1, s))))
    if shift is not None:
        t = shift_4d if shift_4d is not None else graph.call_function(operator.getitem, (shift, index))
        out = graph.call_function(operator.add, (out, t))
    if act != "none":
        fn, kwargs = _TORCH_ACTIVATIONS[act]
        out = graph.call_function(fn, (out,), kwargs)
    return out


def fuse_graph(graph: fx.Graph, small_cpu_elements: Optional[int] = None) -> int:
    """Rewrite every fusable chain after ``groupnorm::forward`` in ``graph`` -> how many
    calls were rewritten (fused, or handed to Inductor as its own group norm when the input
    is on the CPU with fewer than ``small_cpu_elements``, default ``SMALL_CPU_ELEMENTS``)."""
    limit = SMALL_CPU_ELEMENTS if small_cpu_elements is None else small_cpu_elements
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _FORWARD:
            continue
        y_node = _output_of(node)
        if y_node is None:
            continue
        args = list(node.args)
        last, dead = y_node, [y_node]   # dead: in graph order, each the next one's input
        scale_4d = shift_4d = None
        if args[_ACT] == "none" and args[_SCALE] is None and args[_SHIFT] is None:
            found = _modulation(y_node)
            if found is not None:
                scale_4d, shift_4d, chain = found
                args[_SCALE], args[_SHIFT] = scale_4d, shift_4d
                dead += chain
                last = chain[-1]
        act_node = _one_user(last) if args[_ACT] == "none" else None
        act = _activation(act_node, last) if act_node is not None else None
        if act is not None:
            args[_ACT] = act
            last = act_node
            dead.append(act_node)
        small = limit > 0 and _small_cpu(args[0], limit)
        if last is y_node and not small:
            continue
        with graph.inserting_before(last):
            if small:
                out = _composition(graph, args, scale_4d, shift_4d)
            else:
                for i in (_SCALE, _SHIFT):
                    if args[i] is not None and args[i] is not node.args[i]:
                        args[i] = graph.call_method("flatten", (args[i], 1))
                fused = graph.call_function(_FORWARD, tuple(args))
                out = graph.call_function(operator.getitem, (fused, 0))
        out.meta.update(last.meta)
        last.replace_all_uses_with(out)
        for dead_node in reversed(dead):
            graph.erase_node(dead_node)
        graph.erase_node(node)
        count += 1
    return count


def _pass_class():
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class GroupNormFusionPass(CustomGraphPass):
        """Inductor pre-grad pass running ``fuse_graph``; its uuid hashes this file and the
        size limit (Inductor's cache keys include it)."""

        def __call__(self, graph: fx.Graph) -> None:
            fuse_graph(graph)

        def uuid(self) -> bytes:
            return get_hash_for_files((__file__,), extra=str(SMALL_CPU_ELEMENTS))

    return GroupNormFusionPass


_PASS: List[Any] = []


def fusion_pass():
    """The pass object (one per process), for ``pre_grad_custom_pass``."""
    if not _PASS:
        _PASS.append(_pass_class()())
    return _PASS[0]


def options() -> dict:
    """``torch.compile(model, options=options())``: the pass for this compile only."""
    return {"pre_grad_custom_pass": fusion_pass()}


_CHOICE: List[bool] = []   # the user's last enable()/disable(), if any


def auto_enable() -> None:
    """``enable()`` unless the user chose otherwise (``disable()``, or the environment variable
    ``GROUPNORM_COMPILE_FUSION=0``), and only once Inductor's config is imported (as
    ``torch.compile(..., backend="inductor")`` does before tracing): cheap enough to call
    from the op's fake implementation, which runs while Dynamo traces."""
    if _CHOICE or "torch._inductor.config" not in sys.modules:
        return
    if os.environ.get("GROUPNORM_COMPILE_FUSION", "1") == "0":
        _CHOICE.append(False)
        return
    enable()


def enable() -> None:
    """Run the pass in every later Inductor compile (kept beside other custom pre-grad passes)."""
    _CHOICE[:] = [True]
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import get_custom_graph_passes

    passes = get_custom_graph_passes(config.pre_grad_custom_pass)
    if fusion_pass() not in passes:
        config.pre_grad_custom_pass = fusion_pass() if not passes else [*passes, fusion_pass()]


def disable() -> None:
    """Undo ``enable``; ``auto_enable`` then leaves the pass off."""
    _CHOICE[:] = [False]
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import get_custom_graph_passes

    passes = [p for p in get_custom_graph_passes(config.pre_grad_custom_pass) if p is not fusion_pass()]
    config.pre_grad_custom_pass = None if not passes else passes[0] if len(passes) == 1 else passes


__all__ = ["fuse_graph", "fusion_pass", "options", "enable", "disable", "auto_enable"]
