"""Launch a Triton kernel through its compiled handle: microseconds, not tens of them.

``kernel[grid](...)`` runs ``JITFunction.run`` on every call: argument binding,
specialisation, a string cache key, launch metadata. On the H100 host that cost 30-40 us
per launch (BENCHMARKS.md, 2026-11-26), more than the GPU time of a UNet-sized GroupNorm.
Here each kernel is compiled once per specialisation by an ordinary ``kernel[grid]`` call,
whose returned ``CompiledKernel`` is kept under a key that holds every fact Triton
specialises on; later calls with the same key call the compiled launcher directly on the current stream,
with pointers passed as integers (the launcher then skips ``data_ptr()`` and its pointer
check) and no launch hooks.

What the key must hold once ``JITFunction.run`` is bypassed (a missed fact launches a
kernel compiled for other facts: wrong results, not an error): for each pointer its
dtype and whether it is 16-byte aligned; for each integer whether it is 1 (compiled in
as a constant), whether it is divisible by 16 and whether it fits int32 / int64; floats
are not specialised; every constexpr value; the launch options (num_warps); the device.
``specialisation`` states those facts in plain Python (tests check it against Triton's
own ``native_specialize_impl`` on CPU tensors); the launcher's key is finer still (the
integers' values, the addresses mod 16), so that a hit costs no per-argument logic.

Supported Triton: 3.6 to 3.9 (``SUPPORTED``; the sources of 3.6.0 and 3.9.0 were read for
this, and their ``JITFunction.run``, ``CompiledKernel`` and CUDA launcher agree): ``CompiledKernel.run(grid_x, grid_y, grid_z, stream, function,
packed_metadata, launch_metadata, enter_hook, exit_hook, *args)``, every argument
(constexprs included) positional, None metadata and hooks skipped. Other versions, the
interpreter (``TRITON_INTERPRET=1``), CPU tensors and an active launch hook (a profiler)
take ``kernel[grid]``: slower, same results.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Dict, Iterator, Sequence, Tuple

import torch
import triton

SUPPORTED = ((3, 6), (3, 10))   # [low, high) of (major, minor)
# Cached launches per kernel before the cache starts afresh (a key per shape and
# address residue: a model has tens of shapes).
MAX_ENTRIES = 4096

_I32 = (-(2 ** 31), 2 ** 31)
_I64 = (-(2 ** 63), 2 ** 63)
_Tensor = torch.Tensor


def _version(text: str) -> Tuple[int, int]:
    parts = text.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def version_supported(text: str = triton.__version__) -> bool:
    """True for a Triton whose compiled-kernel launch this module was written against."""
    low, high = SUPPORTED
    return low <= _version(text) < high


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def int_fact(value: int):
    """What Triton's specialisation makes of an int argument: 1 is compiled in as a
    constant; others by type (int32, int64, uint64) and divisibility by 16."""
    if value == 1:
        return 1
    kind = 0 if _I32[0] <= value < _I32[1] else (1 if _I64[0] <= value < _I64[1] else 2)
    return (kind, value % 16 == 0)


def specialisation(args: Sequence[Any]) -> Tuple:
    """The facts of the runtime arguments Triton compiles for (see the module docstring):
    tensors (dtype, address % 16 == 0); ints ``int_fact``; floats their type only (a float
    is never specialised, but an int in its place would be)."""
    facts = []
    for a in args:
        kind = type(a)
        if kind is int:
            facts.append(int_fact(a))
        elif kind is float or kind is bool:
            facts.append(kind)
        elif isinstance(a, _Tensor):
            facts.append((a.dtype, a.data_ptr() % 16 == 0))
        else:
            raise TypeError(f"direct launch: unsupported argument type {kind.__name__}")
    return tuple(facts)


class Launcher:
    """One Triton kernel whose pointer parameters (named ``*_ptr``) come first, then its
    other runtime parameters, then its constexpr parameters.

    ``launcher(grid, args, constexprs, num_warps, device)``: ``args`` the runtime arguments
    in signature order (tensors, then ints and floats, each position always of the same
    Python type), ``constexprs`` the constexpr values in signature order, ``device``
    x.get_device() (-1: not CUDA, the fallback).

    The cache key holds the scalars' values themselves (finer than Triton's facts: a new
    shape misses once, launches through kernel[grid] and is cached; Triton's own cache
    makes that launch cheap), each tensor's dtype and its address mod 16, the constexprs,
    num_warps and the device: no per-argument Python logic on a hit."""

    def __init__(self, kernel, constexpr_names: Sequence[str]):
        self.kernel = kernel
        self.names = tuple(constexpr_names)
        params = list(getattr(kernel, "arg_names", ()))
        if params and tuple(params[len(params) - len(self.names):]) != self.names:
            raise ValueError(f"{kernel}: constexprs {self.names} must be its last parameters")
        self.n_ptr = sum(name.endswith("_ptr") for name in params)
        if any(not name.endswith("_ptr") for name in params[:self.n_ptr]):
            raise ValueError(f"{kernel}: pointer parameters (*_ptr) must come first")
        self.compiled: Dict[Tuple, Tuple] = {}
        # Counters the tests read (launches through each path).
        self.direct_launches = 0
        self.fallback_launches = 0

    def key(self, args: Sequence[Any], constexprs: Tuple, num_warps: int, device: int) -> Tuple:
        """The cache key of a launch (``__call__`` builds the same inline)."""
        n = self.n_ptr
        tensors = args[:n]
        return (constexprs, num_warps, device, tuple(args[n:]), tuple([t.dtype for t in tensors]),
                tuple([t.data_ptr() & 15 for t in tensors]))

    def fallback(self, grid, args, constexprs: Tuple, num_warps: int):
        """``kernel[grid]``: compiles on a miss, returns the CompiledKernel (None in the
        interpreter)."""
        self.fallback_launches += 1
        return self.kernel[grid](*args, **dict(zip(self.names, constexprs)), num_warps=num_warps)

    def __call__(self, grid, args, constexprs: Tuple, num_warps: int, device: int = -1):
        if _TRACE.on:   # torch.compile traces the launch (see groupnorm.triton_registration)
            from torch.library import wrap_triton

            wrap_triton(self.kernel)[tuple(grid)](*args, **dict(zip(self.names, constexprs)), num_warps=num_warps)
            return
        if device < 0 or not DIRECT or device != _current_device():
            self.fallback(grid, args, constexprs, num_warps)
            return
        enter, leave = _hooks()
        if enter or leave:   # a profiler listens: let Triton call it
            self.fallback(grid, args, constexprs, num_warps)
            return
        n = self.n_ptr
        tensors = args[:n]
        scalars = args[n:]
        ptrs = [t.data_ptr() for t in tensors]
        key = (constexprs, num_warps, device, tuple(scalars), tuple([t.dtype for t in tensors]),
               tuple([p & 15 for p in ptrs]))
        entry = self.compiled.get(key)
        if entry is None:
            if len(self.compiled) >= MAX_ENTRIES:
                self.compiled.clear()
            compiled = self.fallback(grid, args, constexprs, num_warps)
            if compiled is not None and hasattr(compiled, "run") and hasattr(compiled, "packed_metadata"):
                run = compiled.run     # initialises the handles (already done by the launch above)
                self.compiled[key] = (run, compiled.function, compiled.packed_metadata)
            return
        run, function, metadata = entry
        self.direct_launches += 1
        run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, _raw_stream(device),
            function, metadata, None, None, None, *ptrs, *scalars, *constexprs)


class _Trace(threading.local):
    on = False


_TRACE = _Trace()


@contextlib.contextmanager
def traced() -> Iterator[None]:
    """Inside the block (this thread), every launcher records its launch for torch.compile
    through ``torch.library.wrap_triton`` instead of launching: Inductor then launches the
    kernel with its own launcher, and CUDA graphs can capture it."""
    previous = _TRACE.on
    _TRACE.on = True
    try:
        yield
    finally:
        _TRACE.on = previous


def _hooks():
    """The launch hooks Triton would call (a HookChain is truthy only when it has calls)."""
    runtime = _RUNTIME
    if runtime is None:
        return None, None
    enter = runtime.launch_enter_hook
    leave = runtime.launch_exit_hook
    return (getattr(enter, "calls", enter), getattr(leave, "calls", leave))


try:  # knobs.runtime exists from Triton 3.4 on
    from triton import knobs as _knobs
    _RUNTIME = _knobs.runtime
except ImportError:  # pragma: no cover - older Triton takes the fallback anyway
    _RUNTIME = None

_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
# Triton compiles and loads for the current device: x elsewhere takes kernel[grid].
_current_device = getattr(torch._C, "_cuda_getDevice", lambda: -1)

# The direct launch is on for a supported Triton outside the interpreter; tests flip it.
DIRECT = version_supported() and not _interpreting() and _raw_stream is not None and _RUNTIME is not None
