"""Small parts of torch's contract: argument types torch accepts or refuses, the exception
types of integer inputs, process_group's type, and the memory format of the output for
non-contiguous views of channels-last tensors. Each case against torch itself."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import groupnorm
from groupnorm.backends import registry
from helpers import assert_oracle_close, cpu_backend, make_input, make_params, oracle

X = make_input((2, 8, 5, 3), seed=1)


def _raised(call):
    """The exception call raises (pytest.fail if none)."""
    try:
        call()
    except Exception as error:   # noqa: BLE001 - the type is what is compared
        return error
    pytest.fail("no exception raised")


# --- num_groups ------------------------------------------------------------------------

INTEGER_LIKE = {
    "numpy int64": lambda: np.int64(4),
    "numpy int32": lambda: np.int32(4),
    "numpy uint8": lambda: np.uint8(4),
    "0-d int64 tensor": lambda: torch.tensor(4),
    "0-d int16 tensor": lambda: torch.tensor(4, dtype=torch.int16),
}


@pytest.mark.parametrize("make", INTEGER_LIKE.values(), ids=INTEGER_LIKE.keys())
def test_integer_like_num_groups_work_as_in_torch(make):
    w, b = make_params(8, seed=2)
    torch.testing.assert_close(groupnorm.group_norm(X, make(), w, b), F.group_norm(X, make(), w, b))
    ours, theirs = groupnorm.GroupNorm(make(), 8), torch.nn.GroupNorm(make(), 8)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(w)
            m.bias.copy_(b)
    torch.testing.assert_close(ours(X), theirs(X))
    converted = groupnorm.convert(torch.nn.Sequential(theirs))
    assert type(converted[0]) is groupnorm.GroupNorm
    torch.testing.assert_close(converted(X), F.group_norm(X, 4, w, b))
    # Under autograd, and with a fused extra (the general path).
    x = X.clone().requires_grad_()
    y = groupnorm.group_norm(x, make(), w, b, activation="silu")
    y.sum().backward()
    ref = x.detach().clone().requires_grad_()
    F.silu(F.group_norm(ref, 4, w, b)).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-5)


NOT_INTEGER = {
    "float": lambda: 4.0,
    "numpy float": lambda: np.float64(4),
    "numpy bool": lambda: np.bool_(True),
    "0-d float tensor": lambda: torch.tensor(4.0),
    "0-d bool tensor": lambda: torch.tensor(True),
    "1-d int tensor": lambda: torch.tensor([4]),
    "0-d numpy array": lambda: np.array(4),
}


def test_num_groups_types_accepted_and_refused_as_in_torch():
    for name, make in INTEGER_LIKE.items():
        torch.testing.assert_close(groupnorm.group_norm(X, make()), F.group_norm(X, make()), msg=name)
    for name, make in NOT_INTEGER.items():
        theirs = _raised(lambda: F.group_norm(X, make()))
        ours = _raised(lambda: groupnorm.group_norm(X, make()))
        assert type(ours) is type(theirs) is TypeError, (name, ours, theirs)


# --- eps -------------------------------------------------------------------------------

WRONG_EPS = {
    "str": "1e-5",
    "None": None,
    "1-d tensor": torch.tensor([1e-5]),
    "0-d tensor that requires grad": torch.tensor(1e-5, requires_grad=True),
    "complex": 1e-5j,
    "list": [1e-5],
}


@pytest.mark.parametrize("eps", WRONG_EPS.values(), ids=WRONG_EPS.keys())
def test_wrong_eps_type_raises_torchs_type_error(eps, monkeypatch):
    theirs = _raised(lambda: F.group_norm(X, 4, eps=eps))
    monkeypatch.setattr(registry, "backend_for", lambda *_: pytest.fail("a kernel ran on bad input"))
    for call in (lambda: groupnorm.group_norm(X, 4, eps=eps),                       # the lean path
                 lambda: groupnorm.group_norm(X.clone().requires_grad_(), 4, eps=eps),
                 lambda: groupnorm.group_norm(X, 4, eps=eps, activation="relu"),
                 lambda: groupnorm.GroupNorm(4, 8, eps=eps)(X)):
        ours = _raised(call)
        assert type(ours) is type(theirs), (ours, theirs)
        assert ours.args and "eps" in str(ours)
    with pytest.raises(type(theirs), match="eps"):
        groupnorm.convert(torch.nn.Sequential(torch.nn.GroupNorm(4, 8, eps=eps)))(X)


def test_eps_types_accepted_and_refused_as_in_torch():
    for eps in WRONG_EPS.values():
        with pytest.raises(TypeError, match="eps"):
            F.group_norm(X, 4, eps=eps)
        with pytest.raises(TypeError, match="eps"):
            groupnorm.group_norm(X, 4, eps=eps)
    for eps in (1, True, np.float32(1e-3), np.int64(1), torch.tensor(1e-3), torch.tensor(1, dtype=torch.int32)):
        torch.testing.assert_close(groupnorm.group_norm(X, 4, eps=eps), F.group_norm(X, 4, eps=eps))


# --- integer and other non-float inputs ------------------------------------------------

INT_CASES = [
    # (input dtype, weight dtype, bias dtype): what torch raises depends on the first parameter given.
    (torch.int64, None, None), (torch.int64, torch.float32, torch.float32), (torch.int64, torch.int64, None),
    (torch.int64, None, torch.float32), (torch.int64, torch.int64, torch.float32),
    (torch.int64, torch.float32, torch.int64), (torch.int32, torch.int32, torch.int32),
    (torch.int64, torch.float64, torch.float64), (torch.uint8, torch.float32, None), (torch.bool, None, None),
    (torch.complex64, torch.float32, torch.float32), (torch.float32, torch.int64, None),
    (torch.bfloat16, torch.float64, None), (torch.bfloat16, torch.float32, torch.bfloat16),
]


def test_non_float_inputs_raise_torchs_exception_type(monkeypatch):
    """torch checks the parameters' dtypes against the input's (RuntimeError "mixed dtype")
    before it looks for a kernel for the input's dtype (NotImplementedError), so an integer
    input in a module with float32 parameters raises RuntimeError."""
    g = torch.Generator().manual_seed(3)
    cases = []
    for x_dtype, w_dtype, b_dtype in INT_CASES:
        x = torch.randint(-3, 4, (2, 8, 4, 4), generator=g).to(x_dtype)
        w = None if w_dtype is None else torch.ones(8, dtype=w_dtype)
        b = None if b_dtype is None else torch.zeros(8, dtype=b_dtype)
        cases.append(((x_dtype, w_dtype, b_dtype), lambda f, x=x, w=w, b=b: f(x, 4, w, b)))
    x_int = torch.randint(-3, 4, (2, 8, 4, 4), generator=g)
    cases.append(("module", lambda f: (torch.nn.GroupNorm if f is F.group_norm else groupnorm.GroupNorm)(4, 8)(x_int)))
    theirs = {name: _raised(lambda: call(F.group_norm)) for name, call in cases}
    monkeypatch.setattr(registry, "backend_for", lambda *_: pytest.fail("a kernel ran on bad input"))
    wrong = []
    for name, call in cases:
        ours = _raised(lambda: call(groupnorm.group_norm))
        if type(ours) is not type(theirs[name]):
            wrong.append((name, type(ours).__name__, type(theirs[name]).__name__))
    assert not wrong, wrong
    assert isinstance(theirs["module"], RuntimeError) and not isinstance(theirs["module"], NotImplementedError)


# --- process_group ---------------------------------------------------------------------

@pytest.mark.parametrize("group", [object(), "world", 0, -100], ids=["object", "str", "int", "non-member"])
def test_process_group_that_is_not_a_group_raises_type_error(group):
    with pytest.raises(TypeError, match="ProcessGroup"):
        groupnorm.group_norm(X, 4, process_group=group)
    with pytest.raises(TypeError, match="ProcessGroup|not in the group"):
        groupnorm.GroupNorm(4, 8, process_group=group)


def test_non_member_sentinel_is_named():
    import torch.distributed as dist

    with pytest.raises(TypeError, match="NON_GROUP_MEMBER"):
        groupnorm.group_norm(X, 4, process_group=dist.GroupMember.NON_GROUP_MEMBER)


# --- memory format of views ------------------------------------------------------------

def _channels_last(shape, seed):
    x = make_input(shape, seed=seed)
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


VIEWS = {
    # name: input neither contiguous nor channels-last-dense; torch returns channels-last.
    "tile of H": lambda: _channels_last((2, 8, 12, 7), 4)[..., :5, :],
    "tile of W": lambda: _channels_last((2, 8, 12, 7), 5)[..., 2:6],
    "tile of H and W": lambda: _channels_last((2, 8, 12, 7), 6)[..., 3:9, 1:5],
    "every other sample": lambda: _channels_last((4, 8, 6, 5), 7)[::2],
    "channel slice": lambda: _channels_last((2, 16, 6, 5), 8)[:, 4:12],
    "NHWC permuted, strided": lambda: make_input((2, 12, 7, 8), seed=9).permute(0, 3, 1, 2)[:, :, ::2],
    "5-D tile": lambda: _channels_last((2, 8, 5, 6, 4), 10)[:, :, 1:4],
}


def _assert_same_layout(ours, theirs):
    assert ours.stride() == theirs.stride(), (ours.stride(), theirs.stride())


@pytest.mark.parametrize("make", VIEWS.values(), ids=VIEWS.keys())
def test_views_of_channels_last_keep_torchs_memory_format(make):
    x = make()
    assert not x.is_contiguous() and not x.movedim(1, -1).is_contiguous()
    w, b = make_params(x.shape[1], seed=11)
    y, ref = groupnorm.group_norm(x, 4, w, b), F.group_norm(x, 4, w, b)
    _assert_same_layout(y, ref)
    assert_oracle_close(y, ref, oracle(x, 4, w, b), torch.float32)
    # Under autograd: the output and the input gradient take torch's layout too.
    xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))   # leaves with the view's strides
    xr, wr, br = (t.detach().requires_grad_() for t in (x, w, b))
    dy = make_input(x.shape, seed=12, mean=0.1, std=1.0)
    y = groupnorm.group_norm(xg, 4, wg, bg)
    ref = F.group_norm(xr, 4, wr, br)
    _assert_same_layout(y, ref)
    got = torch.autograd.grad(y, (xg, wg, bg), dy)
    want = torch.autograd.grad(ref, (xr, wr, br), dy)
    _assert_same_layout(got[0], want[0])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * max(1.0, e.abs().max().item()))


def test_views_with_fused_extras_and_stats_keep_the_format():
    x = VIEWS["tile of H and W"]()
    w, b = make_params(8, seed=13)
    scale, shift = 0.1 * make_input((2, 8), seed=14, mean=0.0, std=1.0), make_input((2, 8), seed=15, mean=0.0)
    ref = F.group_norm(x, 4, w, b)
    fused = groupnorm.group_norm(x, 4, w, b, activation="silu", scale=scale, shift=shift)
    _assert_same_layout(fused, ref)
    torch.testing.assert_close(fused, F.silu(ref * (1 + scale[..., None, None]) + shift[..., None, None]),
                               rtol=1e-5, atol=1e-5)
    with_stats = groupnorm.group_norm(x, 4, w, b, stats=groupnorm.group_stats(x, 4))
    _assert_same_layout(with_stats, ref)
    torch.testing.assert_close(with_stats, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_views_keep_the_format_on_other_backends(backend):
    x = _channels_last((2, 4, 6, 3), 16)[..., 1:4, :]
    w, b = make_params(4, seed=17)
    with cpu_backend(backend):
        y = groupnorm.group_norm(x, 2, w, b)
    ref = F.group_norm(x, 2, w, b)
    _assert_same_layout(y, ref)
    assert_oracle_close(y, ref, oracle(x, 2, w, b), torch.float32)


def test_suggested_format_is_torchs_on_random_views():
    """memory_format.suggested against the layout torch's group_norm gives, on random
    permuted, strided views with size-1 and size-2 dims (where c10's rule has its special
    cases) that are neither contiguous nor channels-last (the inputs that get copied)."""
    from groupnorm.memory_format import suggested

    g = torch.Generator().manual_seed(18)
    checked = 0
    for _ in range(600):
        dims = 4 + int(torch.randint(0, 2, (1,), generator=g))
        shape = [int(s) for s in torch.randint(1, 4, (dims,), generator=g)]
        steps = [int(s) for s in torch.randint(1, 3, (dims,), generator=g)]
        base = torch.randn([s * k for s, k in zip(shape, steps)], generator=g)
        perm = torch.randperm(dims, generator=g).tolist()
        view = base.permute(perm)[tuple(slice(None, None, k) for k in steps)]
        if view.shape[0] * view[0].numel() <= 1 or view.is_contiguous() or view.movedim(1, -1).is_contiguous():
            continue   # one value per group (torch refuses), or a layout kernels read as it is
        expected = F.group_norm(view, 1).stride()
        assert view.contiguous(memory_format=suggested(view)).stride() == expected, (view.shape, view.stride())
        checked += 1
    assert checked > 200, checked
