"""torch.library custom ops: the single ops that eager mode, autograd and torch.compile see.

Stages are separate ops so later layers can recombine them:

    groupnorm::forward          x -> (y, mean, rstd)           statistics + apply, one op
    groupnorm::stats            x -> (mean, m2)                per-(n, g) partial statistics
    groupnorm::apply            x, mean, rstd -> y             normalise + affine + epilogue
    groupnorm::backward         dy, x, mean, rstd -> grads     the whole backward, one op
    groupnorm::backward_reduce  dy, x, mean, rstd -> (A, B)    per-(n, c) sums
    groupnorm::backward_dx      dy, x, mean, rstd, sums -> dx

Each op has a fake (meta) implementation for tracing and a kernel per device type taken from
``backends.registry`` (Numba on CPU, Triton on CUDA, the reference elsewhere). Empty inputs
are answered here, so kernels only ever see N * C * HW > 0.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch

from . import grad_terms, reference
from .backends import registry

Tensor = torch.Tensor
LIB = "groupnorm"
_has_storage = torch._C._has_storage


def _stats_shape(x: Tensor, num_groups: int):
    return (x.shape[0], num_groups)


def _stats_dtype(x: Tensor) -> torch.dtype:
    return reference.acc_dtype(x.dtype)


def _group_count(x: Tensor, num_groups: int) -> int:
    """Elements per (n, g) group: C / G * HW."""
    n = x.shape[0]
    return x.numel() // (n * num_groups) if n * num_groups > 0 else 0


def _backend(x: Tensor):
    # x.is_cpu answers in ~0.1 us; x.device.type builds a device object (~1 us per call).
    return registry.backend_for("cpu" if x.is_cpu else x.device.type)


def _empty_stats(x: Tensor, num_groups: int) -> Tensor:
    return torch.zeros(_stats_shape(x, num_groups), dtype=_stats_dtype(x), device=x.device)


# --- forward --------------------------------------------------------------------------

def forward_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor],
                 shift: Optional[Tensor], num_groups: int, eps: float, activation: str
                 ) -> Tuple[Tensor, Tensor, Tensor]:
    """What ``groupnorm::forward`` runs (also called directly by the eager fast path)."""
    if x.numel() == 0:
        rstd = torch.full(_stats_shape(x, num_groups), eps ** -0.5 if eps > 0 else float("inf"),
                          dtype=_stats_dtype(x), device=x.device)
        return torch.empty_like(x), _empty_stats(x, num_groups), rstd
    return _backend(x).forward(x, weight, bias, scale, shift, num_groups, eps, activation)


def output_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor],
                shift: Optional[Tensor], num_groups: int, eps: float, activation: str) -> Tensor:
    """forward_impl's y alone, for the eager path when nothing needs the statistics (no
    gradient): a backend's optional ``forward_output`` skips making them tensors."""
    if x.numel() == 0:
        return torch.empty_like(x)
    backend = _backend(x)
    output = getattr(backend, "forward_output", None)
    if output is not None:
        return output(x, weight, bias, scale, shift, num_groups, eps, activation)
    return backend.forward(x, weight, bias, scale, shift, num_groups, eps, activation)[0]


@torch.library.custom_op(f"{LIB}::forward", mutates_args=())
def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor],
            shift: Optional[Tensor], num_groups: int, eps: float, activation: str
            ) -> Tuple[Tensor, Tensor, Tensor]:
    """y = act((x - mean) * rstd * weight + bias) * (1 + scale) + shift) and its statistics."""
    return forward_impl(x, weight, bias, scale, shift, num_groups, eps, activation)


@forward.register_fake
def _(x, weight, bias, scale, shift, num_groups, eps, activation):
    _fusion_pass_on_by_default()
    stats = x.new_empty(_stats_shape(x, num_groups), dtype=_stats_dtype(x))
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _fusion_pass_on_by_default() -> None:
    """torch.compile traces this op with its fake implementation: that is the moment to
    switch on the fusion pass (``compile_fusion.auto_enable``), which needs Inductor's
    config, too slow to import with ``groupnorm``. ``compile_fusion.disable()`` or
    ``GROUPNORM_COMPILE_FUSION=0`` keep it off."""
    try:
        from . import compile_fusion

        compile_fusion.auto_enable()
    except (ImportError, AttributeError):   # an Inductor without custom pre-grad passes
        pass


@torch.library.custom_op(f"{LIB}::stats", mutates_args=())
def stats(x: Tensor, num_groups: int) -> Tuple[Tensor, Tensor]:
    """Per-(n, g) mean and m2 = sum((x - mean)^2) over this tensor's C/G * HW elements."""
    if x.numel() == 0:
        return _empty_stats(x, num_groups), _empty_stats(x, num_groups)
    return _backend(x).stats(x, num_groups)


@stats.register_fake
def _(x, num_groups):
    out = x.new_empty(_stats_shape(x, num_groups), dtype=_stats_dtype(x))
    return out, torch.empty_like(out)


@torch.library.custom_op(f"{LIB}::apply", mutates_args=())
def apply(x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
          scale: Optional[Tensor], shift: Optional[Tensor], num_groups: int, activation: str) -> Tensor:
    """Normalise x with supplied statistics, then affine, scale/shift, activation."""
    return apply_impl(x, mean, rstd, weight, bias, scale, shift, num_groups, activation)


def apply_impl(x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               scale: Optional[Tensor], shift: Optional[Tensor], num_groups: int, activation: str) -> Tensor:
    """What ``groupnorm::apply`` runs (also called directly by the forward-AD rule)."""
    if x.numel() == 0:
        return torch.empty_like(x)
    mean = mean.to(_stats_dtype(x)).contiguous()
    rstd = rstd.to(_stats_dtype(x)).contiguous()
    return _backend(x).apply(x, mean, rstd, weight, bias, scale, shift, num_groups, activation)


@apply.register_fake
def _(x, mean, rstd, weight, bias, scale, shift, num_groups, activation):
    return torch.empty_like(x)


# --- backward -------------------------------------------------------------------------

@torch.library.custom_op(f"{LIB}::backward_reduce", mutates_args=())
def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                    bias: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
                    num_groups: int, activation: str) -> Tuple[Tensor, Tensor]:
    """Per-(n, c) (sum dz1 * xhat, sum dz1) over this tensor's spatial positions."""
    if x.numel() == 0:
        z = torch.zeros(x.shape[:2], dtype=_stats_dtype(x), device=x.device)
        return z, z.clone()
    dy = _like_layout(dy, x)
    return _backend(x).backward_reduce(dy, x, mean, rstd, weight, bias, scale, shift, num_groups, activation)


@backward_reduce.register_fake
def _(dy, x, mean, rstd, weight, bias, scale, shift, num_groups, activation):
    out = x.new_empty(tuple(x.shape[:2]), dtype=_stats_dtype(x))
    return out, torch.empty_like(out)


@torch.library.custom_op(f"{LIB}::backward_dx", mutates_args=())
def backward_dx(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                bias: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
                sum_dxhat: Tensor, sum_dxhat_xhat: Tensor, count: int, num_groups: int,
                activation: str) -> Tensor:
    """dx from the group sums (count = global elements per group, for sharded inputs)."""
    if x.numel() == 0:
        return torch.empty_like(x)
    dy = _like_layout(dy, x)
    return _backend(x).backward_dx(dy, x, mean, rstd, weight, bias, scale, shift,
                                   sum_dxhat.contiguous(), sum_dxhat_xhat.contiguous(),
                                   count, num_groups, activation)


@backward_dx.register_fake
def _(dy, x, mean, rstd, weight, bias, scale, shift, sum_dxhat, sum_dxhat_xhat, count, num_groups, activation):
    return torch.empty_like(x)


def backward_grads(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                   bias: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
                   num_groups: int, activation: str, need_dx: bool) -> Tuple[Optional[Tensor], ...]:
    """(dx, dweight, dbias, dscale, dshift), None where absent or not needed (dx).

    Calls the backend directly (not the stage ops: a nested custom-op dispatch costs tens of
    microseconds each): its optional ``backward_grads`` or ``backward_fused`` when it has
    them, else the two contract stages.
    """
    if x.numel() == 0:
        sum_dz_xhat = torch.zeros(x.shape[:2], dtype=_stats_dtype(x), device=x.device)
        grads = grad_terms.param_grads(sum_dz_xhat, sum_dz_xhat.clone(), weight, bias, scale, shift)
        return (torch.empty_like(x) if need_dx else None,) + tuple(grads)
    dy = _like_layout(dy, x)
    backend = _backend(x)
    whole = getattr(backend, "backward_grads", None)
    if whole is not None:
        return whole(dy, x, mean, rstd, weight, bias, scale, shift, num_groups, activation, need_dx)
    fused = getattr(backend, "backward_fused", None)
    if fused is not None:
        sum_dz_xhat, sum_dz, dx = fused(dy, x, mean, rstd, weight, bias, scale, shift, num_groups,
                                        activation, need_dx)
    else:
        sum_dz_xhat, sum_dz = backend.backward_reduce(dy, x, mean, rstd, weight, bias, scale, shift,
                                                      num_groups, activation)
        dx = None
        if need_dx:
            s1, s2 = grad_terms.group_sums(sum_dz_xhat, sum_dz, weight, scale, num_groups)
            dx = backend.backward_dx(dy, x, mean, rstd, weight, bias, scale, shift, s1, s2,
                                     _group_count(x, num_groups), num_groups, activation)
    return (dx,) + tuple(grad_terms.param_grads(sum_dz_xhat, sum_dz, weight, bias, scale, shift))


def backward_impl(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                  bias: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
                  num_groups: int, activation: str, need_dx: bool) -> List[Tensor]:
    """[dx, dweight, dbias, dscale, dshift] for the op; absent ones as fresh empty tensors
    (custom-op outputs may be neither None nor aliases of each other)."""
    grads = backward_grads(dy, x, mean, rstd, weight, bias, scale, shift, num_groups, activation, need_dx)
    return [x.new_empty(0) if g is None else g for g in grads]


@torch.library.custom_op(f"{LIB}::backward", mutates_args=())
def backward(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
             bias: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
             num_groups: int, activation: str, need_dx: bool) -> List[Tensor]:
    """The whole backward as one op: [dx, dweight, dbias, dscale, dshift]."""
    return backward_impl(dy, x, mean, rstd, weight, bias, scale, shift, num_groups, activation, need_dx)


@backward.register_fake
def _(dy, x, mean, rstd, weight, bias, scale, shift, num_groups, activation, need_dx):
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    return [dx] + [x.new_empty(0) if t is None else torch.empty_like(t) for t in (weight, bias, scale, shift)]


def _like_layout(dy: Tensor, x: Tensor) -> Tensor:
    # Kernels read dy with x's strides: bring a dy of another layout to x's (rare: a custom
    # op's upstream gradient normally has the output's layout, which is x's).
    if dy.stride() == x.stride():
        return dy
    out = torch.empty_like(x, dtype=dy.dtype)
    out.copy_(dy)
    return out


# --- autograd -------------------------------------------------------------------------

def save_for_backward(ctx, inputs, mean, rstd) -> None:
    """Keep what the backward recomputes from: x, the parameters and the statistics."""
    x, weight, bias, scale, shift, num_groups, eps, activation = inputs
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.num_groups, ctx.eps, ctx.activation = num_groups, eps, activation


def input_grads(ctx, dy, backward_fn):
    """Gradients of (x, weight, bias, scale, shift) for an autograd ctx filled above."""
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    needs = ctx.needs_input_grad[:5]
    if torch.is_grad_enabled() or not _has_storage(dy):
        # create_graph=True (double backward), or a batched dy (gradcheck's batched
        # checks): differentiate the reference composition, which autograd can
        # differentiate again and vmap can batch.
        return _differentiable_backward(ctx, dy, (x, weight, bias, scale, shift), needs)
    grads = backward_fn(dy, x, mean, rstd, weight, bias, scale, shift, ctx.num_groups, ctx.activation, needs[0])
    return tuple(g if need else None for g, need in zip(grads, needs))


def _setup_forward(ctx, inputs, output):
    save_for_backward(ctx, inputs, output[1], output[2])


def _backward_forward(ctx, dy, _dmean, _drstd):
    return input_grads(ctx, dy, backward) + (None, None, None)


def _differentiable_backward(ctx, dy, tensors, needs):
    wanted = [t for t, need in zip(tensors, needs) if need]
    with torch.enable_grad():
        y = reference.differentiable_group_norm(*tensors, ctx.num_groups, ctx.eps, ctx.activation)
        grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    out = []
    for t, need in zip(tensors, needs):
        g = next(grads) if need else None
        out.append(torch.zeros_like(t) if need and g is None else g)
    return tuple(out)


forward.register_autograd(_backward_forward, setup_context=_setup_forward)

# Autocast rules (cast to float32 on CUDA, as torch does for group_norm) need the ops above.
from . import autocast as _autocast  # noqa: E402

_autocast.register()
