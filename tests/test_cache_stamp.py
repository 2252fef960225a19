"""Numba's disk cache follows edits to any module of the package (cache_stamp)."""
import subprocess
import sys
import textwrap
import types

from numba.core.registry import CPUDispatcher

import groupnorm.backends.numba_cpu as numba_cpu
from groupnorm.backends.numba_cpu import (activations, apply_kernels, backward_kernels, bits, cache_stamp, coefs,
                                          elements, entries, fast_store, forward_kernels, stats_kernels)

KERNEL_MODULES = (activations, apply_kernels, backward_kernels, bits, coefs, elements, entries, fast_store,
                  forward_kernels, stats_kernels)


def _cached_dispatchers(module: types.ModuleType):
    for value in vars(module).values():
        if isinstance(value, CPUDispatcher) and value.__module__ == module.__name__ and value._cache._enabled:
            yield value


def test_every_cached_kernel_is_stamped_with_the_package_hash():
    assert cache_stamp.INSTALLED
    found = 0
    for module in KERNEL_MODULES:
        for dispatcher in _cached_dispatchers(module):
            locator = dispatcher._cache._impl._locator
            assert getattr(locator, "groupnorm_directory", None) == cache_stamp.PACKAGE_DIR, dispatcher
            assert locator.get_source_stamp()[1] == cache_stamp.sources_hash()
            found += 1
    assert found >= 30   # the kernels of every module above were looked at


def test_sources_hash_changes_with_any_module(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 1\n")
    (tmp_path / "notes.txt").write_text("ignored\n")
    first = cache_stamp.sources_hash(str(tmp_path))
    (tmp_path / "notes.txt").write_text("still ignored\n")
    assert cache_stamp.sources_hash(str(tmp_path)) == first
    (tmp_path / "b.py").write_text("y = 2\n")
    assert cache_stamp.sources_hash(str(tmp_path)) != first


_RUN = """
import sys
sys.path.insert(0, {root!r})
from groupnorm.backends.numba_cpu import cache_stamp
if {stamped}:
    assert cache_stamp.install({package!r})
import {name}.kernel
print({name}.kernel.run())
"""


def _make_package(root, name):
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helper.py").write_text("from numba import njit\n\n@njit\ndef value():\n    return 1\n")
    (package / "kernel.py").write_text(textwrap.dedent(f"""
        from numba import njit
        from {name}.helper import value

        @njit(cache=True)
        def run():
            return value()
        """))
    return package


def _run(root, package, name, stamped):
    code = _RUN.format(root=str(root), package=str(package), name=name, stamped=stamped)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_editing_a_helper_recompiles_the_kernel_that_inlines_it(tmp_path):
    """Without the stamp Numba loads the cached kernel with the old helper inlined (the
    control shows it on this Numba); with it, the edit is seen."""
    results = {}
    for stamped in (False, True):
        name = f"pkg_stamped_{stamped}".lower()
        package = _make_package(tmp_path, name)
        assert _run(tmp_path, package, name, stamped) == 1     # compiles, fills the cache
        (package / "helper.py").write_text("from numba import njit\n\n@njit\ndef value():\n    return 2\n")
        results[stamped] = _run(tmp_path, package, name, stamped)
    assert results[True] == 2
    # results[False] is the control: 1 on Numba 0.68 (per-file stamps: the stale helper)
