"""Which backend runs for which device: one table, one override, no scattered ifs.

``GROUPNORM_BACKEND_<DEVICE>`` (e.g. ``GROUPNORM_BACKEND_CPU=reference``) or the
``use_backend`` context manager override the table; tests use both to run the Triton kernels
on CPU tensors under ``TRITON_INTERPRET=1`` and to compare every backend with the reference.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
import warnings
from types import ModuleType
from typing import Dict, Iterator, List

# Module path of each backend, by name.
BACKENDS: Dict[str, str] = {
    "reference": "groupnorm.reference",
    "numba": "groupnorm.backends.numba_cpu",
    "triton": "groupnorm.backends.triton_gpu",
}

# Preferred backends per device type, first available wins; "reference" always is.
DEFAULTS: Dict[str, List[str]] = {
    "cpu": ["numba", "reference"],
    "cuda": ["triton", "reference"],
}

# The five functions of the backend contract (groupnorm/backends/__init__.py).
CONTRACT = ("forward", "stats", "apply", "backward_reduce", "backward_dx")

_local = threading.local()
# How many use_backend blocks are open, in any thread: while none is, no thread has an
# override and cpu_backend skips the thread-local lookup (~5 us right after a kernel).
_open_overrides = 0
_count_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def load(name: str) -> ModuleType | None:
    """Import a backend by name; None when its dependency (numba, triton) is missing or the
    module does not provide the whole contract.

    A missing dependency is the expected case and stays quiet; an import error inside
    this package (a broken install, a bad edit) also falls back, since the reference
    backend gives the same results, but says so: silently, the only symptom was a
    GroupNorm tens of times slower."""
    try:
        module = importlib.import_module(BACKENDS[name])
    except ImportError as error:
        if name == "reference":
            raise
        if _ours(error):
            warnings.warn(f"groupnorm: the {name!r} backend failed to import ({error}); tensors it would run "
                          f"fall back to the next backend (the reference one is slow)", RuntimeWarning,
                          stacklevel=2)
        return None
    return module if all(callable(getattr(module, f, None)) for f in CONTRACT) else None


def _ours(error: ImportError) -> bool:
    """True when the import failed on this package's own code, not on a dependency:
    ``error.name`` is the module that could not be imported (or that lacked the name)."""
    return error.name is None or error.name == "groupnorm" or error.name.startswith("groupnorm.")


def _override(device_type: str) -> str | None:
    forced = getattr(_local, "forced", {}).get(device_type)
    return forced or os.environ.get(f"GROUPNORM_BACKEND_{device_type.upper()}") or None


def backend_name(device_type: str) -> str:
    """Name of the backend that runs for tensors on ``device_type``."""
    forced = _override(device_type)
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"unknown groupnorm backend {forced!r}; known: {sorted(BACKENDS)}")
        if load(forced) is None:
            raise ImportError(f"groupnorm backend {forced!r} was requested but cannot be imported")
        return forced
    for name in DEFAULTS.get(device_type, ["reference"]):
        if load(name) is not None:
            return name
    return "reference"


_ENV_KEYS: Dict[str, object] = {}
_RESOLVED: Dict[tuple, ModuleType] = {}
# os.environ.get costs ~1 us on a miss (it raises and catches KeyError); its backing dict
# (a CPython detail, kept in sync by os.environ's setters) answers in ~0.1 us.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENCODE = getattr(os.environ, "encodekey", None)
_FAST_ENV = isinstance(_ENV_DATA, dict) and callable(_ENCODE)


def _env_key(device_type: str):
    name = f"GROUPNORM_BACKEND_{device_type.upper()}"
    return _ENCODE(name) if _FAST_ENV else name


def _env_value(key):
    return _ENV_DATA.get(key) if _FAST_ENV else os.environ.get(key)


def backend_for(device_type: str) -> ModuleType:
    """The backend module for a device type (see the contract in ``groupnorm.backends``).

    Runs on every call, so the resolution is memoised on what can change it (this
    thread's override and the environment variable), read afresh each time.
    """
    key = _ENV_KEYS.get(device_type)
    if key is None:
        key = _ENV_KEYS[device_type] = _env_key(device_type)
    forced = getattr(_local, "forced", None)
    memo = (device_type, forced.get(device_type) if forced else None, _env_value(key))
    module = _RESOLVED.get(memo)
    if module is None:
        module = _RESOLVED[memo] = load(backend_name(device_type))
    return module


_CPU_ENV_KEY = _env_key("cpu")
_cpu_memo = (None, None)   # (environment value, module) of the last cpu_backend call


def cpu_backend() -> ModuleType:
    """``backend_for("cpu")`` for the everyday call: with no override open anywhere, one
    read of the environment and one comparison (the general memo builds and hashes a
    tuple key and reads a thread-local, ~10 us right after a kernel)."""
    global _cpu_memo
    if _open_overrides:
        return backend_for("cpu")
    env = _env_value(_CPU_ENV_KEY)
    seen, module = _cpu_memo
    if module is None or env != seen:
        module = backend_for("cpu")
        _cpu_memo = (env, module)
    return module


def _count_override(step: int) -> None:
    global _open_overrides
    with _count_lock:
        _open_overrides += step


@contextlib.contextmanager
def use_backend(name: str, device_type: str = "cpu") -> Iterator[None]:
    """Run ops on ``device_type`` with backend ``name`` inside the block (this thread only)."""
    _count_override(1)
    try:
        with _forced(name, device_type):
            yield
    finally:
        _count_override(-1)


@contextlib.contextmanager
def _forced(name: str, device_type: str) -> Iterator[None]:
    forced = dict(getattr(_local, "forced", {}))
    previous = forced.get(device_type)
    forced[device_type] = name
    _local.forced = forced
    try:
        yield
    finally:
        forced = dict(_local.forced)
        if previous is None:
            forced.pop(device_type, None)
        else:
            forced[device_type] = previous
        _local.forced = forced
