"""Argument and input checks, raising what torch raises, before any kernel runs.

Messages name the offending values. Exception types follow torch.nn.functional.group_norm
on the CPU so code that catches torch's errors keeps working.
"""
from __future__ import annotations

import math
import sys
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


class NumGroupsZeroError(ValueError, ZeroDivisionError):
    """num_groups == 0. torch raises ZeroDivisionError here (from a Python modulo), so we do
    too, with a message; it is also a ValueError, which is what the mistake is."""


def _numpy_scalar_kind(value) -> str:
    """"integer", "real" (floating or bool) or "" for a NumPy scalar; "" for anything else.
    NumPy is looked up only if already imported: nothing else can hold a NumPy scalar."""
    numpy = sys.modules.get("numpy")
    if numpy is None or not isinstance(value, numpy.generic):
        return ""
    if isinstance(value, numpy.integer):
        return "integer"
    return "real" if isinstance(value, (numpy.floating, numpy.bool_)) else ""


def as_num_groups(value) -> int:
    """num_groups as the Python int the kernels take, accepting what torch's argument parser
    accepts for an int: a Python int, a NumPy integer, or a 0-d integer tensor (bools and
    floats refused with torch's TypeError). ``nn.GroupNorm(np.int64(8), 32)`` runs in torch."""
    if type(value) is int:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if _numpy_scalar_kind(value) == "integer":
        return int(value)
    if (isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point()
            and not value.is_complex() and value.dtype != torch.bool):
        return int(value.item())
    raise TypeError(f"group_norm(): argument 'num_groups' (position 2) must be int, not {type(value).__name__}")


def as_eps(value) -> float:
    """eps as a Python float, accepting what torch's parser accepts for a float (Python and
    NumPy reals, bools, 0-d tensors that need no gradient) and raising its TypeError for the
    rest: ``eps="1e-5"`` must fail as in torch, not be parsed."""
    if type(value) is float:
        return value
    if isinstance(value, (int, float)) or _numpy_scalar_kind(value):
        return float(value)
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad:
        if value.is_complex():
            raise RuntimeError("value cannot be converted to type double without overflow")
        return float(value.item())
    raise TypeError(f"group_norm(): argument 'eps' (position 5) must be float, not {type(value).__name__}")


def check_num_groups_arg(num_groups) -> None:
    """num_groups must be an integer (see ``as_num_groups``) other than 0."""
    if as_num_groups(num_groups) == 0:
        raise NumGroupsZeroError("num_groups must be greater than 0, got 0")


def check_module_args(num_groups, num_channels) -> None:
    """Constructor checks of torch.nn.GroupNorm, plus a clear error for num_groups <= 0."""
    check_num_groups_arg(num_groups)
    num_groups = as_num_groups(num_groups)
    if num_groups < 0:
        raise ValueError(f"num_groups must be greater than 0, got {num_groups}")
    if num_channels % num_groups != 0:
        raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")


def _check_vector(name: str, t: Optional[torch.Tensor], x: torch.Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"group_norm(): argument '{name}' must be Tensor or None, not {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != x.shape[1]:
        raise RuntimeError(
            f"Expected {name} to be a vector of size equal to the number of channels in input, "
            f"but got {name} of shape {list(t.shape)} and input of shape {list(x.shape)}")
    _check_device(name, t, x)


def _check_device(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.device != x.device:
        raise RuntimeError(f"Expected {name} on device {x.device} like the input, but got {name} on {t.device}")


def _check_mixed_dtypes(x: torch.Tensor, weight, bias) -> None:
    """torch's CPU rule, checked before the input's own dtype as torch does (so an integer
    input with float parameters raises RuntimeError, not NotImplementedError): the first
    parameter given decides; where its dtype differs from the input's, every parameter must
    be float32 and the input bfloat16 or float16."""
    first = weight if weight is not None else bias
    if first is None or first.dtype == x.dtype:
        return
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != torch.float32:
            raise RuntimeError(
                f"mixed dtype (CPU): expect parameter to have scalar type of Float; got {name} of dtype "
                f"{t.dtype} for input of dtype {x.dtype} (parameters share the input's dtype, or are "
                "float32 for a bfloat16 / float16 input)")
    if x.dtype not in HALF_DTYPES:
        raise RuntimeError(
            f"mixed dtype (CPU): all inputs must share same datatype; got float32 parameters for input "
            f"of dtype {x.dtype}")


def _check_param_dtypes(weight, bias) -> None:
    # After _check_mixed_dtypes and the input's dtype check, what can still be wrong.
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise RuntimeError(f"group_norm(): weight ({weight.dtype}) and bias ({bias.dtype}) must share a dtype")


def _check_scale_shift(name: str, t: Optional[torch.Tensor], x: torch.Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"group_norm(): argument '{name}' must be Tensor or None, not {type(t).__name__}")
    if tuple(t.shape) != (x.shape[0], x.shape[1]):
        raise RuntimeError(
            f"Expected {name} of shape (N, C) = {[x.shape[0], x.shape[1]]} for input of shape "
            f"{list(x.shape)}, but got {name} of shape {list(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise RuntimeError(f"group_norm(): {name} must be a floating-point tensor, got dtype {t.dtype}")
    _check_device(name, t, x)


FLOAT_SET = frozenset(FLOAT_DTYPES)
# Memory formats that make an (N, C, *) tensor channels-last, by dimension count.
CHANNELS_LAST_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}
_Parameter = torch.nn.Parameter


def plain_param_ok(t, dtype: torch.dtype, channels: int, x: torch.Tensor, x_is_cpu: bool) -> bool:
    """weight/bias the kernels read as they are: None, or an exact tensor or nn.Parameter
    of shape (C,) on x's device, in x's dtype (float32 also for a half x, as torch allows).
    dtype and x_is_cpu: x's, as the caller has read them (each query costs microseconds)."""
    if t is None:
        return True
    kind = type(t)
    if (kind is not torch.Tensor and kind is not _Parameter) or t.shape != (channels,):
        return False
    if not (t.is_cpu and x_is_cpu) and t.device != x.device:   # is_cpu: no device objects
        return False
    return t.dtype == dtype or (t.dtype == torch.float32 and dtype in HALF_DTYPES)


def common_case_ok(x, num_groups, weight, bias) -> bool:
    """True for the everyday valid call (a plain float tensor, an int num_groups dividing C,
    matching 1-D parameters), decided in about a microsecond. False means "not sure": the
    caller then runs check_inputs, which raises torch's exception for whatever is wrong."""
    if type(x) is not torch.Tensor or type(num_groups) is not int or num_groups <= 0:
        return False
    shape = x.shape
    dtype = x.dtype
    if len(shape) < 2 or shape[1] % num_groups or dtype not in FLOAT_SET:
        return False
    if x.numel() == num_groups:   # one value per group: torch's training-mode ValueError
        return False
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        return False
    on_cpu = x.is_cpu
    return (plain_param_ok(weight, dtype, shape[1], x, on_cpu)
            and plain_param_ok(bias, dtype, shape[1], x, on_cpu))


def check_inputs(x, num_groups, weight=None, bias=None, scale=None, shift=None, *, training_check=True,
                 eps=1e-5) -> None:
    """Every check of F.group_norm, in torch's order, plus our keyword extras."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"group_norm(): argument 'input' must be Tensor, not {type(x).__name__}")
    if x.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {x.dim()}")
    check_num_groups_arg(num_groups)
    num_groups = as_num_groups(num_groups)
    if training_check:
        _verify_more_than_one_value(x, num_groups)
    as_eps(eps)   # torch parses its arguments here, after F.group_norm's Python-level checks
    if num_groups < 0:
        raise RuntimeError(f"Expected num groups to be greater than 0, got {num_groups}")
    if x.shape[1] % num_groups != 0:
        raise RuntimeError(
            "Expected number of channels in input to be divisible by num_groups, but got input "
            f"of shape {list(x.shape)} and num_groups={num_groups}")
    _check_vector("weight", weight, x)
    _check_vector("bias", bias, x)
    _check_mixed_dtypes(x, weight, bias)
    if x.dtype not in FLOAT_DTYPES:
        raise NotImplementedError(
            f"group_norm: input dtype {x.dtype} is not supported; expected one of "
            f"{', '.join(str(d) for d in FLOAT_DTYPES)}")
    _check_param_dtypes(weight, bias)
    _check_scale_shift("scale", scale, x)
    _check_scale_shift("shift", shift, x)


def _verify_more_than_one_value(x: torch.Tensor, num_groups: int) -> None:
    # torch.nn.functional._verify_batch_size on [N * C // G, G, *spatial].
    if num_groups <= 0:
        return
    size_prods = (x.shape[0] * x.shape[1] // num_groups) * math.prod(x.shape[2:])
    if size_prods == 1:
        shape: Sequence[int] = [x.shape[0] * x.shape[1] // num_groups, num_groups, *x.shape[2:]]
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {shape}")
