"""Bad input is refused before any kernel runs, with the exception type torch raises."""
import pytest
import torch
import torch.nn.functional as F

import groupnorm
from groupnorm.backends import registry

X = torch.randn(2, 6, 4, 4)


def _bad_calls():
    return [
        ("channels not divisible", lambda f: f(X, 4), "num_groups=4"),
        ("negative groups", lambda f: f(X, -2), "-2"),
        ("zero groups", lambda f: f(X, 0), None),
        ("1-D input", lambda f: f(torch.randn(6), 1), "received 1"),
        ("0-D input", lambda f: f(torch.tensor(1.0), 1), "received 0"),
        ("weight wrong size", lambda f: f(X, 3, torch.ones(5)), "\\[5\\]"),
        ("weight 2-D", lambda f: f(X, 3, torch.ones(6, 1)), "\\[6, 1\\]"),
        ("bias wrong size", lambda f: f(X, 3, None, torch.ones(4)), "\\[4\\]"),
        ("integer input", lambda f: f(X.long(), 3), "Long|int64"),
        ("complex input", lambda f: f(X.to(torch.complex64), 3), "Complex|complex64"),
        ("float groups", lambda f: f(X, 3.0), "int"),
        ("one value per channel", lambda f: f(torch.randn(1, 6), 6), "more than 1 value"),
        ("weight on another device", lambda f: f(X, 3, torch.ones(6, device="meta")), "device"),
        ("float64 weight for float32 input", lambda f: f(X, 3, torch.ones(6, dtype=torch.float64)), None),
    ]


@pytest.mark.parametrize("name,call,pattern", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_same_exception_type_as_torch(name, call, pattern, monkeypatch):
    with pytest.raises(Exception) as theirs:
        call(F.group_norm)
    # Any kernel call would be a failure: errors must come before computation.
    monkeypatch.setattr(registry, "backend_for", lambda *_: pytest.fail("a kernel ran on bad input"))
    with pytest.raises(type(theirs.value)) as ours:
        call(groupnorm.group_norm)
    if pattern:
        assert ours.match(pattern)


def test_zero_groups_is_also_a_value_error():
    with pytest.raises(ValueError, match="greater than 0"):
        groupnorm.group_norm(X, 0)


@pytest.mark.parametrize("kw,pattern", [
    ({"scale": torch.ones(2, 5)}, "scale"),
    ({"shift": torch.ones(6)}, "shift"),
    ({"scale": torch.ones(2, 6, dtype=torch.long)}, "floating"),
    ({"activation": "tanhh"}, "activation"),
])
def test_extras_are_validated(kw, pattern):
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        groupnorm.group_norm(X, 3, **kw)


def test_activation_type_error():
    with pytest.raises(TypeError, match="activation"):
        groupnorm.group_norm(X, 3, activation=torch.nn.SiLU())


def test_stats_and_process_group_are_exclusive():
    stats = groupnorm.group_stats(X, 3)
    with pytest.raises(ValueError, match="not both"):
        groupnorm.group_norm(X, 3, stats=stats, process_group=object())


@pytest.mark.parametrize("name,call,pattern", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_quick_acceptance_never_waves_bad_input_through(name, call, pattern):
    """validation.common_case_ok skips the full checks on the hot path: it must say "not
    sure" (False) for every call the full checks refuse."""
    from groupnorm import validation

    seen = []
    call(lambda x, num_groups, weight=None, bias=None: seen.append((x, num_groups, weight, bias)))
    assert not validation.common_case_ok(*seen[0])


@pytest.mark.parametrize("dtype,param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16), (torch.float64, torch.float64)])
def test_quick_acceptance_takes_everyday_calls(dtype, param_dtype):
    from groupnorm import validation

    x = X.to(dtype)
    w = torch.ones(6, dtype=param_dtype)
    assert validation.common_case_ok(x, 3, w, w.clone())
    assert validation.common_case_ok(x, 3, None, None)
    other = torch.float64 if param_dtype != torch.float64 else torch.float32
    assert not validation.common_case_ok(x, 3, w, torch.ones(6, dtype=other))  # dtypes differ
    assert not validation.common_case_ok(x, True, None, None)  # a bool is not a group count
