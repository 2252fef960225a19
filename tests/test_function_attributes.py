"""LLVM attributes on the package's Numba functions (function_attributes): 512-bit vectors
on them and only them (except the float32/float64 elementwise passes), the sum functions
kept out of line; and a kernel's statistics the same whether compiled in this process or
loaded from the disk cache (the sums' fixed order itself: test_lanes.py)."""
import os
import subprocess
import sys
import types

import llvmlite.binding as llvm
import llvmlite.ir as ir
import numba
import numpy as np
import pytest

from groupnorm.backends.numba_cpu import function_attributes as fa

HAS_AVX512 = "+avx512f" in llvm.get_host_cpu_features().flatten().split(",")
OURS = "groupnorm.backends.numba_cpu.probe_module"


def _sum_loop(a):
    total = 0.0
    for i in range(a.size):
        total += a[i] * 2.0
    return total


def _scale_loop(a, out):
    for i in range(a.size):
        out[i] = a[i] + a[i]


def _compiled_as(module_name: str, fastmath, out_of_line=False):
    """A fresh copy of _sum_loop compiled as if defined in module_name (no disk cache)."""
    dispatcher = numba.njit(fastmath=fastmath)(_named(module_name, "sum_loop"))
    if out_of_line:
        fa.out_of_line(dispatcher)
    a = np.random.default_rng(0).standard_normal(1000)
    assert dispatcher(a) == pytest.approx(2.0 * a.sum())
    return dispatcher


def _named(module_name, name, template=_sum_loop):
    fn = type(template)(template.__code__, template.__globals__, name)
    fn.__module__, fn.__qualname__ = module_name, name
    return fn


def _define(module, name):
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), []), name)
    ir.IRBuilder(fn.append_basic_block()).ret_void()
    return fn


def test_only_package_definitions_are_marked(monkeypatch):
    monkeypatch.setattr(fa, "_OUT_OF_LINE", set())
    fa.out_of_line(types.SimpleNamespace(py_func=_named("groupnorm.backends.numba_cpu.probe", "summed")))
    module = ir.Module("probe")
    summed = _define(module, fa.PACKAGE_PREFIX + "5probe6summedB2v1Ed")
    summed_longer = _define(module, fa.PACKAGE_PREFIX + "5probe7summed2B2v1Ed")   # another name
    inlined = _define(module, fa.PACKAGE_PREFIX + "5probe6summedB2v2Ef")
    inlined.attributes.add("alwaysinline")
    theirs = _define(module, "_ZN5other6summedB2v1Ed")
    declared = ir.Function(module, ir.FunctionType(ir.VoidType(), []), fa.PACKAGE_PREFIX + "5probe6summedB2v3Ex")
    assert fa.mark_package_functions(module) == 3
    for fn in (summed, summed_longer, inlined):
        assert fa.WIDE_VECTORS in fn.attributes
    assert "noinline" in summed.attributes
    assert "noinline" not in summed_longer.attributes
    assert "noinline" not in inlined.attributes          # never both
    for fn in (theirs, declared):
        assert not fn.attributes
    llvm.parse_assembly(str(module)).verify()   # the attributes are valid IR as printed


def test_elementwise_passes_keep_the_default_width_unless_half_typed(monkeypatch):
    monkeypatch.setattr(fa, "_ELEMENTWISE", set())
    fa.elementwise(types.SimpleNamespace(py_func=_named("groupnorm.backends.numba_cpu.probe", "applied")))
    module = ir.Module("probe")
    name = fa.PACKAGE_PREFIX + "5probe7appliedB2v1E"
    float32 = _define(module, name + "5ArrayIfLi1E1C7mutable7alignedE")
    float64 = _define(module, name + "5ArrayIdLi2E1A7mutable7alignedE")
    bfloat16 = _define(module, name + "5ArrayIfLi1E1C7mutable7alignedE5ArrayItLi2E1C7mutable7alignedE")
    float16 = _define(module, name + "5ArrayIsLi2E1A8readonly7alignedE")
    other = _define(module, fa.PACKAGE_PREFIX + "5probe8appliedXB2v1E5ArrayIfLi1E1C7mutable7alignedE")
    assert fa.mark_package_functions(module) == 5
    assert fa.WIDE_VECTORS not in float32.attributes and fa.WIDE_VECTORS not in float64.attributes
    for fn in (bfloat16, float16, other):
        assert fa.WIDE_VECTORS in fn.attributes
    llvm.parse_assembly(str(module)).verify()


def test_the_elementwise_passes_are_registered():
    from groupnorm.backends.numba_cpu import apply_kernels, backward_kernels, forward_kernels

    for fn in (forward_kernels.groups_apply, apply_kernels.apply_rows_none, apply_kernels.apply_pixels,
               backward_kernels.dx_rows_none, backward_kernels.dx_pixels):
        assert fa.mangled_prefix(f"{fn.py_func.__module__}.{fn.py_func.__qualname__}") in fa._ELEMENTWISE


def test_the_sum_kernels_are_registered():
    from groupnorm.backends.numba_cpu import backward_kernels, stats_kernels

    for fn in (stats_kernels.chunk_moments, stats_kernels.shifted_chunk_moments, stats_kernels.channel_sums_to_groups,
               backward_kernels.dz_sums, backward_kernels.reduce_rows_none):
        assert fa.mangled_prefix(f"{fn.py_func.__module__}.{fn.py_func.__qualname__}") in fa._OUT_OF_LINE


def _attributes_of(dispatcher, name, signature) -> str:
    """The attributes of the compiled function itself (not of Numba's runtime helpers)."""
    module = llvm.parse_assembly(dispatcher.inspect_llvm(signature))
    (fn,) = [f for f in module.functions if name in f.name and not f.is_declaration
             and f.name.startswith("_ZN") and not f.name.startswith("_ZN7cpython")]   # not the wrappers
    return " ".join(str(a) for a in fn.attributes)


def _attributes_of_sum_loop(dispatcher) -> str:
    return _attributes_of(dispatcher, "sum_loop", dispatcher.signatures[0])


def test_compiled_code_carries_the_attributes_only_in_the_package():
    assert fa.INSTALLED
    ours_sum = _attributes_of_sum_loop(_compiled_as(OURS, {"reassoc", "contract"}, out_of_line=True))
    ours_plain = _attributes_of_sum_loop(_compiled_as(OURS + "_2", {"reassoc", "contract"}))
    theirs = _attributes_of_sum_loop(_compiled_as("some_user_module", {"reassoc", "contract"}, out_of_line=True))
    assert "prefer-vector-width" in ours_sum and "prefer-vector-width" in ours_plain
    assert "prefer-vector-width" not in theirs
    assert "noinline" in ours_sum
    assert "noinline" not in ours_plain and "noinline" not in theirs


@pytest.mark.skipif(not HAS_AVX512, reason="the host CPU has no AVX-512: the width attribute changes nothing")
def test_package_loops_use_512_bit_registers_on_avx512():
    ours = _compiled_as(OURS, {"reassoc", "contract"})
    assert "zmm" in ours.inspect_asm(ours.signatures[0])


def test_compiled_elementwise_passes_are_wide_only_for_half_types():
    dispatcher = fa.elementwise(numba.njit(_named(OURS + "_elementwise", "scale_loop", _scale_loop)))
    for dtype, wide in ((np.float32, False), (np.float64, False), (np.uint16, True), (np.int16, True)):
        a = np.arange(1000).astype(dtype)
        out = np.empty_like(a)
        dispatcher(a, out)
        assert np.array_equal(out, a + a)
        attributes = _attributes_of(dispatcher, "scale_loop", dispatcher.signatures[-1])
        assert ("prefer-vector-width" in attributes) is wide, dtype


_FORWARD = """
import sys, torch
from groupnorm.backends.numba_cpu import launch, streaming
x = torch.randn((1, 6, 17, 23), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
streaming.STREAM_MIN_ITEMSIZE = 0

def forward(stream):
    streaming.STREAM_MIN_BYTES = 0 if stream else 1 << 62
    return launch.forward(x, None, None, None, None, 3, 1e-5, "none")

plain = forward(False)
if sys.argv[1] == "compare":
    streamed = forward(True)
    print(all(torch.equal(a, b) for a, b in zip(plain, streamed)))
"""


def test_statistics_are_the_same_in_a_cached_and_a_fresh_specialisation(tmp_path):
    """The first process compiles the plain contiguous forward (empty cache); the second
    loads it and compiles the streamed one, which shares the statistics kernels. With the
    sums inlined into their callers, the mean differed by 1 ulp between the two."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    outputs = [subprocess.run([sys.executable, "-c", _FORWARD, mode], env=env, capture_output=True, text=True,
                              check=True).stdout.strip() for mode in ("compile", "compare")]
    assert outputs[1] == "True"


def test_install_is_idempotent_and_skips_a_numba_without_the_hook(monkeypatch):
    wrapped = fa.cpu.CPUContext.post_lowering
    assert fa.install() and fa.cpu.CPUContext.post_lowering is wrapped   # once only
    monkeypatch.delattr(fa.cpu.CPUContext, "post_lowering")
    monkeypatch.delattr(fa.cpu.BaseContext, "post_lowering", raising=False)
    assert fa.install() is False


def test_every_package_function_states_its_flags():
    """Numba compiles a function that states no ``fastmath`` / ``error_model`` with the
    flags of whichever caller compiles it first in a process, then reuses (and caches)
    that specialisation everywhere: the same source then rounds differently from one
    process to the next (seen: a cold pytest-xdist run where the fused and two-stage
    float64 backward with silu/mish disagreed in the last bits; the activation helpers
    on that path stated no flags). Every jitted function of the backend states both."""
    import importlib
    import pkgutil

    import groupnorm.backends.numba_cpu as pkg
    from numba.core.registry import CPUDispatcher

    checked, unstated = 0, []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, CPUDispatcher) and value.py_func.__module__ == module.__name__:
                checked += 1
                if not {"fastmath", "error_model"} <= set(value.targetoptions):
                    unstated.append(f"{info.name}.{name}")
    assert checked > 50   # the scan found the kernels
    assert not unstated, unstated
