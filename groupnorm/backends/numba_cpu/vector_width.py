"""Let LLVM vectorise this package's kernels with 512-bit registers where the CPU has them.

LLVM's tuning for Intel server and client cores with AVX-512 prefers 256-bit vectors
(the ``prefer-256-bit`` tuning, against the clock drop of early AVX-512 parts), so
Numba's code used half the register width that ATen's AVX-512 kernels use. Our bfloat16
loops are bound by their bit conversions, not by memory, and ran 10-21% faster with
512-bit vectors on a 2-core AVX-512 Xeon (BENCHMARKS.md); float32 loops, bound by memory,
were unchanged.

Clang's ``-mprefer-vector-width=512`` sets a function attribute; we set the same one on
the functions of this package only, as Numba lowers them (``CPUContext.post_lowering``),
so other Numba code in the process keeps LLVM's choice. On a CPU without AVX-512 the
attribute changes nothing: LLVM never vectorises wider than the registers. The attribute
is part of the machine code Numba caches, and the cache stamp (cache_stamp) covers this
file, so cached kernels always match it.
"""
from __future__ import annotations

from numba.core import cpu

ATTRIBUTE = '"prefer-vector-width"="512"'
# Numba's mangled names start with the Itanium encoding of the defining module's path.
PACKAGE_PREFIX = "_ZN9groupnorm8backends9numba_cpu"


def prefer_wide_vectors(module) -> int:
    """Add ATTRIBUTE to every function of this package defined in an llvmlite.ir module;
    returns how many were marked."""
    marked = 0
    for fn in module.functions:
        if fn.blocks and fn.name.startswith(PACKAGE_PREFIX):
            # FunctionAttributes.add accepts LLVM's keyword attributes only; a string
            # attribute is printed as given ('"key"="value"' in the define line).
            set.add(fn.attributes, ATTRIBUTE)
            marked += 1
    return marked


def install() -> bool:
    """Wrap CPUContext.post_lowering once; True when in place."""
    original = cpu.CPUContext.post_lowering
    if getattr(original, "groupnorm_vector_width", False):
        return True

    def post_lowering(self, mod, library):
        prefer_wide_vectors(mod)
        return original(self, mod, library)

    post_lowering.groupnorm_vector_width = True
    cpu.CPUContext.post_lowering = post_lowering
    return True


INSTALLED = install()
