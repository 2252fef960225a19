"""The package's Numba functions, and only they, ask LLVM for 512-bit vectors (vector_width)."""
import llvmlite.binding as llvm
import llvmlite.ir as ir
import numba
import numpy as np
import pytest

from groupnorm.backends.numba_cpu import vector_width

HAS_AVX512 = "+avx512f" in llvm.get_host_cpu_features().flatten().split(",")


def _sum_loop(a):
    total = 0.0
    for i in range(a.size):
        total += a[i] * 2.0
    return total


def _compiled_as(module_name: str):
    """A fresh copy of _sum_loop compiled as if defined in module_name (no disk cache)."""
    fn = type(_sum_loop)(_sum_loop.__code__, _sum_loop.__globals__, "sum_loop")
    fn.__module__ = module_name
    fn.__qualname__ = "sum_loop"
    dispatcher = numba.njit(fastmath=True)(fn)
    a = np.random.default_rng(0).standard_normal(1000)
    assert dispatcher(a) == pytest.approx(2.0 * a.sum())
    return dispatcher


def test_only_package_functions_are_marked():
    module = ir.Module("probe")
    fnty = ir.FunctionType(ir.VoidType(), [])
    ours = ir.Function(module, fnty, vector_width.PACKAGE_PREFIX + "5probeEv")
    theirs = ir.Function(module, fnty, "_ZN5other5probeEv")
    declared = ir.Function(module, fnty, vector_width.PACKAGE_PREFIX + "8declaredEv")
    for fn in (ours, theirs):   # bodies: definitions (declared stays a declaration)
        ir.IRBuilder(fn.append_basic_block()).ret_void()
    assert vector_width.prefer_wide_vectors(module) == 1
    assert vector_width.ATTRIBUTE in ours.attributes
    assert vector_width.ATTRIBUTE not in theirs.attributes
    assert vector_width.ATTRIBUTE not in declared.attributes
    llvm.parse_assembly(str(module)).verify()   # the attribute is valid IR as printed


def test_compiled_package_code_carries_the_attribute_and_other_code_does_not():
    assert vector_width.INSTALLED
    ours = _compiled_as("groupnorm.backends.numba_cpu.probe_module")
    theirs = _compiled_as("some_user_module")
    assert "prefer-vector-width" in ours.inspect_llvm(ours.signatures[0])
    assert "prefer-vector-width" not in theirs.inspect_llvm(theirs.signatures[0])


@pytest.mark.skipif(not HAS_AVX512, reason="the host CPU has no AVX-512: the attribute changes nothing")
def test_package_loops_use_512_bit_registers_on_avx512():
    ours = _compiled_as("groupnorm.backends.numba_cpu.probe_module")
    assert "zmm" in ours.inspect_asm(ours.signatures[0])
