"""``group_norm``: torch.nn.functional.group_norm's signature, plus keyword-only extras."""
from __future__ import annotations

from typing import Optional

import torch
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import eager, everyday, memory_format, ops, portable, validation
from .epilogue import activation_name

Tensor = torch.Tensor


def is_channels_last(x: Tensor) -> bool:
    """x's memory is (N, *spatial, C)-contiguous: ``x.movedim(1, -1).is_contiguous()``,
    asked without making the view for 4-D / 5-D x (a view costs microseconds per call)."""
    fmt = validation.CHANNELS_LAST_FORMATS.get(x.dim())
    return x.is_contiguous(memory_format=fmt) if fmt is not None else x.movedim(1, -1).is_contiguous()


def kernel_layout(x: Tensor) -> Tensor:
    """x itself when it is NCHW-contiguous or channels-last (what kernels read without a
    copy); otherwise a copy in the memory format torch's output would have (channels-last
    for a tile of a channels-last tensor, see ``memory_format``), which the output keeps."""
    if x.is_contiguous() or is_channels_last(x):
        return x
    return x.contiguous(memory_format=memory_format.suggested(x))


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5, *,
               activation: Optional[str] = None, scale: Optional[Tensor] = None,
               shift: Optional[Tensor] = None, stats=None, process_group=None) -> Tensor:
    """Group Normalization, equal to ``torch.nn.functional.group_norm``.

    Keyword-only extras (fused in the same pass over ``input``):
      activation: None, "silu", "gelu", "gelu_tanh", "relu" or "mish", applied last.
      scale, shift: (N, C) per-sample modulation, ``z * (1 + scale) + shift`` after the affine.
      stats: a ``GroupStats`` (e.g. merged over tiles) to normalise with instead of the input's.
      process_group: a torch.distributed group over which ``input`` is sharded spatially.
    """
    if scale is None and shift is None and stats is None and process_group is None:
        y = everyday.output(input, num_groups, weight, bias, eps, activation)
        if y is not None:
            return y
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(
            group_norm, (input, weight, bias), input, num_groups, weight=weight, bias=bias, eps=eps,
            activation=activation, scale=scale, shift=shift, stats=stats, process_group=process_group)
    if process_group is not None:   # checks its arguments with the other ranks: see distributed
        if portable.exporting():
            raise RuntimeError("group_norm(): ONNX export does not support process_group=")
        from .distributed import sharded_group_norm

        return sharded_group_norm(input, num_groups, weight, bias, eps, activation, scale, shift, stats,
                                  process_group)
    if not (scale is None and shift is None and validation.common_case_ok(input, num_groups, weight, bias)):
        validation.check_inputs(input, num_groups, weight, bias, scale, shift, eps=eps)
    num_groups, eps = validation.as_num_groups(num_groups), validation.as_eps(eps)
    act = "none" if activation is None else activation_name(activation)
    if portable.exporting():   # ONNX: standard operators, not our kernels
        if stats is not None:
            raise RuntimeError("group_norm(): ONNX export does not support stats=")
        return portable.torch_group_norm(input, num_groups, weight, bias, float(eps), act, scale, shift)
    x = kernel_layout(input)
    if stats is not None:
        from .stats import group_norm_with_stats

        return group_norm_with_stats(x, num_groups, weight, bias, eps, act, scale, shift, stats)
    if eager.usable(x, weight, bias, scale, shift) or eager.transformed(x):
        return eager.group_norm(x, weight, bias, scale, shift, num_groups, float(eps), act)
    return ops.forward(x, weight, bias, scale, shift, num_groups, float(eps), act)[0]
