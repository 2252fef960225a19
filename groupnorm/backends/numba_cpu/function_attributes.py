"""LLVM function attributes on this package's Numba functions, set as Numba lowers them.

Two jobs, both applied in ``CPUContext.post_lowering`` to the functions of this package
only (other Numba code in the process keeps LLVM's defaults):

* ``"prefer-vector-width"="512"`` (what clang's ``-mprefer-vector-width=512`` sets).
  LLVM's tuning for cores with AVX-512 keeps loops at 256 bits, half of what ATen's
  AVX-512 kernels use; our bfloat16 loops, bound by their bit conversions, ran 10-32%
  faster with 512-bit vectors on an AVX-512 Xeon (BENCHMARKS.md), and so did the
  channels-last statistics and backward sums of small float32 shapes (up to 16%). The
  exception are the float32/float64 specialisations of the elementwise passes registered
  with ``elementwise`` (apply, dx): bound by memory, they ran up to 13% faster with
  256-bit vectors on mid and large shapes, within +-6% on the smallest (measured per
  kernel in one process, clones of the same code with and without the attribute:
  benchmarks/ab_vector_width.py at eb1f750), so they keep LLVM's default; their half-type specialisations (arrays
  of uint16/int16 bits in the signature) get the wide vectors. A CPU without AVX-512
  ignores the attribute: LLVM never vectorises wider than the registers.
* ``noinline`` on the sum functions registered with ``out_of_line``. Until 2026-11-28
  (1f97982) they were the only functions compiled with ``reassoc``, and LLVM regrouped a
  sum once it was inlined into a caller, so the same kernel summed in another order when
  compiled inside a caller than when its callee came from the disk cache; keeping them
  out of line was the first, partial, defence (a caller's module still re-optimised its
  linked copy). Their sums now run in lanes (``lanes.py``), an order no optimisation can
  change; they stay out of line as they were measured. Registered by name: helpers such
  as ``elements.load`` must stay inline (a call per element made bfloat16 kernels 10x
  slower).

The attributes are part of the machine code Numba caches, and the cache stamp
(cache_stamp) covers this file, so cached kernels always match it.
"""
from __future__ import annotations

from numba.core import cpu, funcdesc

WIDE_VECTORS = '"prefer-vector-width"="512"'
# Numba's mangled names start with the Itanium encoding of the defining module's path.
PACKAGE_PREFIX = "_ZN9groupnorm8backends9numba_cpu"
_OUT_OF_LINE: set = set()   # mangled-name prefixes of the registered sum functions
_ELEMENTWISE: set = set()   # ... and of the elementwise passes
# Half types reach the kernels as arrays of their bits: Itanium "t" = uint16 (bfloat16),
# "s" = int16 (float16), in the mangled argument types of a specialisation.
HALF_ARRAY_CODES = ("5ArrayIt", "5ArrayIs")


# What mangled_prefix gives where Numba's mangler is missing or changed: no function
# name contains it, so nothing is registered and LLVM's defaults apply (plain Numba).
NO_PREFIX = "\0groupnorm: no mangler"


def mangled_prefix(qualified_name: str) -> str:
    """The start of every specialisation's mangled name of a function ("module.qualname"):
    Numba appends the ABI tags ("B...") and argument types ("E...") to it. The
    length-prefixed encoding keeps one function's prefix from matching another's."""
    mangler = getattr(funcdesc, "default_mangler", None)
    try:
        mangled = mangler(qualified_name, ())   # "_ZN" + name parts + "E"
    except Exception:   # noqa: BLE001 - a Numba without this internal: plain behaviour
        return NO_PREFIX
    if not isinstance(mangled, str) or not mangled.endswith("E"):
        return NO_PREFIX
    return mangled[:-1]


def _prefix_of(dispatcher) -> str:
    py_func = dispatcher.py_func
    return mangled_prefix(f"{py_func.__module__}.{py_func.__qualname__}")


def out_of_line(dispatcher):
    """Decorator (outside ``@njit``): never inline this function into its callers."""
    _OUT_OF_LINE.add(_prefix_of(dispatcher))
    return dispatcher


def elementwise(dispatcher):
    """Decorator (outside ``@njit``): a memory-bound elementwise pass; its float32/float64
    specialisations keep LLVM's default vector width (see above)."""
    _ELEMENTWISE.add(_prefix_of(dispatcher))
    return dispatcher


def _registered(name: str, prefixes=None) -> bool:
    prefixes = _OUT_OF_LINE if prefixes is None else prefixes
    return any(name.startswith(p) and name[len(p):len(p) + 1] in ("B", "E") for p in prefixes)


def wants_wide_vectors(name: str) -> bool:
    """Every package function but the float32/float64 specialisations of elementwise ones."""
    return not _registered(name, _ELEMENTWISE) or any(code in name for code in HALF_ARRAY_CODES)


def mark_package_functions(module) -> int:
    """Set the attributes above on the functions of this package defined in an
    llvmlite.ir module; returns how many functions were marked."""
    marked = 0
    for fn in module.functions:
        if not (fn.blocks and fn.name.startswith(PACKAGE_PREFIX)):
            continue
        # FunctionAttributes.add accepts LLVM's keyword attributes only; a string
        # attribute is printed as given ('"key"="value"' in the define line).
        if wants_wide_vectors(fn.name):
            set.add(fn.attributes, WIDE_VECTORS)
        if _registered(fn.name) and "alwaysinline" not in fn.attributes:
            fn.attributes.add("noinline")
        marked += 1
    return marked


def install() -> bool:
    """Wrap CPUContext.post_lowering once; True when in place. A Numba without that hook
    gets nothing (LLVM's defaults, as for any Numba code), like cache_stamp's fallback."""
    original = getattr(cpu.CPUContext, "post_lowering", None)
    if original is None:
        return False
    if getattr(original, "groupnorm_function_attributes", False):
        return True

    def post_lowering(self, mod, *args, **kwargs):
        try:
            mark_package_functions(mod)
        except Exception:   # noqa: BLE001 - llvmlite's IR objects changed: LLVM's defaults
            pass
        return original(self, mod, *args, **kwargs)

    post_lowering.groupnorm_function_attributes = True
    cpu.CPUContext.post_lowering = post_lowering
    return True


INSTALLED = install()
