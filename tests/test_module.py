"""GroupNorm module: torch.nn.GroupNorm's contract in every observable way."""
import copy
import io

import pytest
import torch

import groupnorm
from helpers import make_input


def test_is_torch_groupnorm_with_same_parameters_and_repr():
    ours, theirs = groupnorm.GroupNorm(4, 12), torch.nn.GroupNorm(4, 12)
    assert isinstance(ours, torch.nn.GroupNorm)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    assert torch.equal(ours.weight, torch.ones(12)) and torch.equal(ours.bias, torch.zeros(12))
    assert ours.weight.requires_grad and ours.bias.requires_grad


def test_affine_false_has_no_parameters():
    ours, theirs = groupnorm.GroupNorm(3, 6, eps=1e-3, affine=False), torch.nn.GroupNorm(3, 6, eps=1e-3, affine=False)
    assert ours.weight is None and ours.bias is None
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == []
    x = make_input((2, 6, 5))
    torch.testing.assert_close(ours(x), theirs(x))


def test_bias_false_keyword():
    ours = groupnorm.GroupNorm(2, 4, bias=False)
    assert ours.bias is None and ours.weight is not None
    x = make_input((3, 4, 7))
    ours.weight.data.uniform_(0.5, 1.5)
    torch.testing.assert_close(ours(x), torch.nn.functional.group_norm(x, 2, ours.weight))


def test_device_and_dtype_arguments():
    m = groupnorm.GroupNorm(2, 4, device="cpu", dtype=torch.float64)
    assert m.weight.dtype == torch.float64 and m.bias.device.type == "cpu"


def test_reset_parameters():
    m = groupnorm.GroupNorm(2, 4)
    with torch.no_grad():
        m.weight.uniform_()
        m.bias.uniform_()
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(4)) and torch.equal(m.bias, torch.zeros(4))


def test_torch_checkpoint_loads_into_ours_and_back():
    theirs = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    ours = groupnorm.GroupNorm(4, 8)
    ours.load_state_dict(torch.load(buffer))
    x = make_input((2, 8, 6, 5))
    torch.testing.assert_close(ours(x), theirs(x))
    back = torch.nn.GroupNorm(4, 8)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.weight, theirs.weight) and torch.equal(back.bias, theirs.bias)


def test_train_and_eval_give_the_same_output():
    m = groupnorm.GroupNorm(2, 6)
    with torch.no_grad():
        m.weight.normal_()
    x = make_input((3, 6, 4, 4))
    y_train = m.train()(x)
    y_eval = m.eval()(x)
    assert torch.equal(y_train, y_eval)


def test_deepcopy_and_pickle():
    m = groupnorm.GroupNorm(2, 6, activation="silu")
    m2 = copy.deepcopy(m)
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    m3 = torch.load(buffer, weights_only=False)
    x = make_input((2, 6, 3))
    assert torch.equal(m(x), m2(x)) and torch.equal(m(x), m3(x))
    assert "activation='silu'" in repr(m)


def test_from_torch_shares_parameters():
    theirs = torch.nn.GroupNorm(2, 6).double().eval()
    ours = groupnorm.GroupNorm.from_torch(theirs)
    assert ours.weight is theirs.weight and ours.bias is theirs.bias
    assert not ours.training
    x = make_input((2, 6, 9), dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("num_groups,num_channels,exc", [(4, 6, ValueError), (0, 6, ZeroDivisionError),
                                                          (-2, 6, ValueError), (2.0, 6, TypeError)])
def test_constructor_errors(num_groups, num_channels, exc):
    with pytest.raises(exc, match=str(num_groups) if exc is not TypeError else "int"):
        groupnorm.GroupNorm(num_groups, num_channels)


def test_constructor_errors_match_torch_types():
    for args in [(4, 6), (0, 6)]:
        with pytest.raises(Exception) as theirs:
            torch.nn.GroupNorm(*args)
        with pytest.raises(type(theirs.value)):
            groupnorm.GroupNorm(*args)


def test_input_channels_must_match_num_channels():
    m = groupnorm.GroupNorm(3, 6)
    with pytest.raises(RuntimeError, match="weight of shape \\[6\\]"):
        m(make_input((2, 9, 4)))
