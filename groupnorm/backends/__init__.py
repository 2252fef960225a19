"""Kernel backends and the one registry that picks them.

The backend contract
--------------------
A backend is a module exposing five functions. Inputs arrive validated: ``x`` is
``(N, C, *)`` with ``N * C * HW > 0``, either contiguous (NCHW) or channels-last
(``x.movedim(1, -1)`` contiguous); ``weight``/``bias`` are ``(C,)`` or None (their dtype
equals x's, or is float32 for a half/bfloat16 x); ``scale``/``shift`` are ``(N, C)`` float
tensors or None; ``activation`` is one of ``groupnorm.epilogue.ACTIVATIONS``. Statistics
tensors (``mean``, ``rstd``, ``m2`` and the reduction sums) are float32, or float64 for a
float64 ``x``, and contiguous. Outputs shaped like ``x`` keep x's dtype and memory format.

``forward(x, weight, bias, scale, shift, num_groups, eps, activation) -> (y, mean, rstd)``
``stats(x, num_groups) -> (mean, m2)``                    # each (N, G); m2 = sum (x - mean)^2
``apply(x, mean, rstd, weight, bias, scale, shift, num_groups, activation) -> y``
``backward_reduce(dy, x, mean, rstd, weight, bias, scale, shift, num_groups, activation)
    -> (sum_dz_xhat, sum_dz)``                            # each (N, C), summed over HW
``backward_dx(dy, x, mean, rstd, weight, bias, scale, shift, sum_dxhat, sum_dxhat_xhat,
    count, num_groups, activation) -> dx``

Optional extensions a backend may add (the op layer uses them when present):
``forward_output(...)`` with forward's arguments -> y alone (an inference call, where
nothing needs the statistics); ``backward_fused`` / ``backward_grads`` (see numba_cpu).
For ``groupnorm.everyday`` (the everyday CPU call, facts read once by the caller):
``forward_known`` -> y, ``forward_known_stats`` -> (y, stats, address) and
``backward_known`` -> (dx, dweight, dbias) (see numba_cpu.launch); without them that
path uses the functions above.

``groupnorm.reference`` is the specification: each backend must match it.
"""
