"""Forward-mode AD and vmap rules for the eager autograd.Function (``eager.GroupNormFunction``).

``torch.func`` transforms and ``torch.autograd.forward_ad`` reach our kernels through that
Function: functorch unwraps its inputs before ``forward`` runs, asks ``jvp`` for tangents
and ``vmap`` for a batching rule. Both rules below are written with our kernels (the
backend's backward and apply stages) plus a few elementwise torch ops, never by running
the layer as a slow composition.

Tangent (t = input tangent, mean_g over each (n, g) group, xhat = (x - mean) * rstd):

    dxhat = rstd * (t - mean_g(t) - xhat * mean_g(t * xhat))   # the backward's dx with w = 1
    dz0   = w * dxhat + t_w * xhat + t_b                        # z0 = xhat * w + b
    dz1   = dz0 * (1 + scale) + z0 * t_scale + t_shift          # z1 = z0 * (1 + scale) + shift
    dy    = act'(z1) * dz1

Batching: statistics are per sample, so a vmapped batch dimension folds into N exactly.
Per-sample scale/shift fold with it; a batched weight or bias (model ensembles) becomes a
per-sample affine applied after the kernel's normalisation.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import ops, reference
from .epilogue import activation_grad, apply_activation
from .reference import acc_dtype

Tensor = torch.Tensor

_functorch = torch._C._functorch
_wrapped = _functorch.is_functorch_wrapped_tensor
# Plain tensors made while a transform is active would be wrapped by it: the kernel
# route runs with functorch's dispatch off, on the peeled tensors.
_functorch_off = torch._C._DisableFuncTorch
# False for the batched tensors of torch._vmap_internals (gradcheck's batched checks).
_has_storage = torch._C._has_storage


# --- functorch levels -------------------------------------------------------------------

def peel(tensors):
    """The tensors with the current functorch level's wrapper removed.

    functorch runs a Function's ``jvp`` and ``backward`` on tensors wrapped at the
    transform's own level (so outer transforms can see through the rule). The rule's
    result is not differentiated again at that level, so our kernels may read the
    tensors beneath; wrappers of *outer* levels stay, and the caller then takes the
    composable torch-ops route."""
    level = _functorch.maybe_current_level()
    if level is None:
        return tuple(tensors)
    return tuple(_functorch._unwrap_for_grad(t, level) if _grad_wrapped_at(t, level) else t for t in tensors)


def _grad_wrapped_at(t, level: int) -> bool:
    # A grad / jvp wrapper of this level (a vmap level's BatchedTensor is not peeled).
    return (t is not None and _wrapped(t) and not _functorch.is_batchedtensor(t)
            and _functorch.maybe_get_level(t) == level)


def needs_composable(tensors) -> bool:
    """A kernel cannot serve: an outer transform wraps a tensor, or autograd must record
    the rule itself (create_graph / an outer level's gradient)."""
    grad = torch.is_grad_enabled()
    return any(t is not None and (_wrapped(t) or not _has_storage(t) or (grad and t.requires_grad))
               for t in tensors)


def _layer(num_groups: int, eps: float, activation: str):
    """The layer as torch ops over (x, weight, bias, scale, shift), for the composable route."""
    def layer(x, weight, bias, scale, shift):
        return reference.differentiable_group_norm(x, weight, bias, scale, shift, num_groups, eps, activation)
    return layer


def composable_grads(primals, dy, needs, num_groups: int, eps: float, activation: str):
    """torch.func.vjp of the torch-ops layer: gradients an outer transform can differentiate."""
    present = [i for i, (p, need) in enumerate(zip(primals, needs)) if p is not None and need]

    def fn(*args):
        full = list(primals)
        for i, a in zip(present, args):
            full[i] = a
        return _layer(num_groups, eps, activation)(*full)

    _, vjp_fn = torch.func.vjp(fn, *(primals[i] for i in present))
    grads = dict(zip(present, vjp_fn(dy)))
    return tuple(grads.get(i) for i in range(len(primals)))


def functorch_backward(ctx, dy):
    """``GroupNormFunction.backward`` under a functorch grad transform."""
    saved = ctx.saved_tensors
    dy, *saved = peel((dy,) + tuple(saved))
    x, weight, bias, scale, shift, mean, rstd = saved
    needs = ctx.needs_input_grad[:5]
    primals = (x, weight, bias, scale, shift)
    if needs_composable((dy,) + tuple(primals)):
        return composable_grads(primals, dy, needs, ctx.num_groups, ctx.eps, ctx.activation)
    with _functorch_off():
        grads = ops.backward_grads(dy, x, mean, rstd, weight, bias, scale, shift, ctx.num_groups,
                                   ctx.activation, needs[0])
    return tuple(g if need else None for g, need in zip(grads, needs))


def functorch_tangent(ctx, tangents):
    """``GroupNormFunction.jvp``: kernels where the tensors allow, else the composable route."""
    peeled = peel(tuple(ctx.saved_tensors) + tuple(tangents))
    x, weight, bias, scale, shift, mean, rstd = peeled[:7]
    tangents = peeled[7:]
    primals = (x, weight, bias, scale, shift)
    if needs_composable(primals + tuple(tangents)):
        return tangent(x, weight, bias, scale, shift, mean, rstd, ctx.num_groups, ctx.eps, ctx.activation,
                       *tangents, kernels=False)
    with _functorch_off():
        return tangent(x, weight, bias, scale, shift, mean, rstd, ctx.num_groups, ctx.eps, ctx.activation,
                       *tangents)


def _channel(t: Tensor, like: Tensor) -> Tensor:
    """(C,) -> broadcastable over (N, C, *)."""
    return t.reshape((1, -1) + (1,) * (like.dim() - 2))


def _sample_channel(t: Tensor, like: Tensor) -> Tensor:
    """(N, C) -> broadcastable over (N, C, *)."""
    return t.reshape(tuple(t.shape) + (1,) * (like.dim() - 2))


def _normalised_and_tangent_kernels(x, mean, rstd, num_groups, tx, want_xhat, acc):
    """(xhat, dxhat) from our kernels: the backward's dx with w = 1 is dxhat."""
    dxhat = None
    if tx is not None:
        dxhat = ops.backward_grads(tx.to(x.dtype), x, mean, rstd, None, None, None, None,
                                   num_groups, "none", True)[0].to(acc)
    xhat = ops.apply_impl(x, mean, rstd, None, None, None, None, num_groups, "none").to(acc) if want_xhat else None
    return xhat, dxhat


def _normalised_and_tangent_torch(x, eps, num_groups, tx, acc):
    """(xhat, dxhat) in torch ops, statistics recomputed from x, so an outer transform
    differentiates them too."""
    n = x.shape[0]
    xg = x.to(acc).reshape(n, num_groups, -1)
    mean = xg.mean(-1, keepdim=True)
    centred = xg - mean
    rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
    xhat = centred * rstd
    dxhat = None
    if tx is not None:
        tg = tx.to(acc).reshape(n, num_groups, -1)
        dxhat = rstd * (tg - tg.mean(-1, keepdim=True) - xhat * (tg * xhat).mean(-1, keepdim=True))
        dxhat = dxhat.reshape(x.shape)
    return xhat.reshape(x.shape), dxhat


def tangent(x, weight, bias, scale, shift, mean, rstd, num_groups: int, eps: float, activation: str,
            tx, tweight, tbias, tscale, tshift, kernels: bool = True) -> Optional[Tensor]:
    """The output tangent of y = act((xhat * w + b) * (1 + scale) + shift); None when
    every input tangent is None. ``kernels``: xhat and dxhat from our kernels (plain
    tensors), else from torch ops (tensors an outer transform still wraps)."""
    if all(t is None for t in (tx, tweight, tbias, tscale, tshift)):
        return None
    acc = acc_dtype(x.dtype)
    want_xhat = tweight is not None or tscale is not None or activation != "none"
    if kernels:
        xhat, dxhat = _normalised_and_tangent_kernels(x, mean, rstd, num_groups, tx, want_xhat, acc)
    else:
        xhat, dxhat = _normalised_and_tangent_torch(x, eps, num_groups, tx, acc)
    dz = None
    if dxhat is not None:
        dz = dxhat if weight is None else dxhat * _channel(weight.to(acc), x)
    if tweight is not None:
        term = xhat * _channel(tweight.to(acc), x)
        dz = term if dz is None else dz + term
    if tbias is not None:
        term = _channel(tbias.to(acc), x)
        dz = term.expand(x.shape) if dz is None else dz + term
    if scale is not None or shift is not None or tscale is not None or tshift is not None or activation != "none":
        n, c = x.shape[0], x.shape[1]
        z0, z1 = (z.reshape(x.shape) for z in
                  reference._pre_activation(xhat.reshape(n, c, -1), weight, bias, scale, shift))
        if dz is not None and scale is not None:
            dz = dz * (1.0 + _sample_channel(scale.to(acc), x))
        if tscale is not None:
            term = z0 * _sample_channel(tscale.to(acc), x)
            dz = term if dz is None else dz + term
        if tshift is not None:
            term = _sample_channel(tshift.to(acc), x)
            dz = term.expand(x.shape) if dz is None else dz + term
        if activation != "none":
            dz = dz * activation_grad(z1, activation)
    if not kernels:
        return dz.to(x.dtype)
    out = torch.empty_like(x)   # x's dtype and memory format, as y has
    out.copy_(dz)
    return out


# --- vmap ---------------------------------------------------------------------------------

def _front(t: Optional[Tensor], dim: Optional[int], size: int) -> Optional[Tensor]:
    """The batched view with its batch dimension first; an unbatched tensor expanded."""
    if t is None:
        return None
    if dim is None:
        return t.unsqueeze(0).expand((size,) + tuple(t.shape))
    return t.movedim(dim, 0)


def _fold(t: Optional[Tensor]) -> Optional[Tensor]:
    """(B, N, ...) -> (B * N, ...)."""
    return None if t is None else t.reshape((t.shape[0] * t.shape[1],) + tuple(t.shape[2:]))


def batched_call(apply_fn, batch_size: int, in_dims, x, weight, bias, scale, shift,
                 num_groups: int, eps: float, activation: str):
    """vmap rule: ((y, mean, rstd), out_dims) computed by ``apply_fn`` (the Function's
    own apply, so the autograd and forward-AD rules still hold) on the folded batch."""
    xd, wd, bd, sd, hd = in_dims[:5]
    xb = _front(x, xd, batch_size)
    n = xb.shape[1]
    xf = _fold(xb)
    # Per-sample modulation: (N, C) per vmapped element -> (B * N, C).
    scale_f = None if scale is None else _fold(_front(scale, sd, batch_size))
    shift_f = None if shift is None else _fold(_front(shift, hd, batch_size))
    if wd is None and bd is None:
        y, mean, rstd = apply_fn(xf, weight, bias, scale_f, shift_f, num_groups, eps, activation)
    else:
        # A weight or bias per vmapped element: normalise in the kernel, then the affine,
        # modulation and activation per sample with torch ops (exact, differentiable).
        xhat, mean, rstd = apply_fn(xf, None, None, None, None, num_groups, eps, "none")
        acc = acc_dtype(x.dtype)
        z = xhat.to(acc)
        for param, dim in ((weight, wd), (bias, bd)):
            if param is None:
                continue
            per = _front(param, dim, batch_size).to(acc)                 # (B, C)
            per = per.unsqueeze(1).expand(batch_size, n, per.shape[-1])  # (B, N, C)
            per = _sample_channel(_fold(per), z)
            z = z * per if param is weight else z + per
        if scale_f is not None:
            z = z * (1.0 + _sample_channel(scale_f.to(acc), z))
        if shift_f is not None:
            z = z + _sample_channel(shift_f.to(acc), z)
        y = apply_activation(z, activation).to(x.dtype)
    unfold = (batch_size, n)
    y = y.reshape(unfold + tuple(y.shape[1:]))
    mean = mean.reshape(unfold + tuple(mean.shape[1:]))
    rstd = rstd.reshape(unfold + tuple(rstd.shape[1:]))
    return (y, mean, rstd), (0, 0, 0)


def _vmap_forward_op(info, in_dims, x, weight, bias, scale, shift, num_groups, eps, activation):
    """The same rule for the ``groupnorm::forward`` custom op (vmap under torch.compile,
    or code that calls the op directly)."""
    return batched_call(ops.forward, info.batch_size, in_dims, x, weight, bias, scale, shift,
                        num_groups, eps, activation)


ops.forward.register_vmap(_vmap_forward_op)
