"""Numba's on-disk cache, invalidated by a change to any module of this package.

Numba stamps each cached function with its own source file only, but our kernels inline
helpers from sibling modules (elements, bits, coefs, activations, ...). After an edit to
a helper, a kernel in an unchanged file would load the old machine code from the cache
and silently run the old helper. The locators installed here add one hash over every
module of this package to each kernel's stamp, so any edit recompiles all of them once.

Installed from the package's ``__init__`` before any kernel module is imported: Numba
chooses a function's locator when the function is decorated. Functions outside this
package keep Numba's own locators. Where a Numba version lacks the hooks used here
(``CacheImpl._locator_classes`` and its locator classes), nothing is installed and the
per-file stamps apply, as before.
"""
from __future__ import annotations

import hashlib
import os

from numba.core import caching

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

# Numba's own locators we stand in front of (the NUMBA_CACHE_DIR one, the in-tree
# __pycache__ one, the per-user fallback), named with or without the leading underscore
# of older Numba releases.
_BASE_NAMES = ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")


def sources_hash(directory: str = PACKAGE_DIR) -> bytes:
    """sha256 over the names and contents of the directory's .py files, in name order."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        if name.endswith(".py"):
            with open(os.path.join(directory, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read() + b"\0")
    return digest.digest()


def _stamped_locator(base: type, directory: str, package_hash: bytes) -> type:
    """``base``, for functions defined in ``directory`` only, with package_hash in the stamp."""

    class PackageStampedLocator(base):
        groupnorm_directory = directory

        def get_source_stamp(self):
            return (super().get_source_stamp(), package_hash)

        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.dirname(os.path.abspath(py_file)) != directory:
                return None
            return super().from_function(py_func, py_file)

    PackageStampedLocator.__name__ = "PackageStamped" + base.__name__.lstrip("_")
    return PackageStampedLocator


def _numba_hooks():
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    bases = [getattr(caching, n, None) or getattr(caching, "_" + n, None) for n in _BASE_NAMES]
    if impl is None or not isinstance(getattr(impl, "_locator_classes", None), list) or None in bases:
        return None, []
    return impl, bases


def install(directory: str = PACKAGE_DIR) -> bool:
    """Put package-stamped locators for ``directory`` first; True when they are in place."""
    impl, bases = _numba_hooks()
    if impl is None:
        return False
    current = impl._locator_classes
    if any(getattr(c, "groupnorm_directory", None) == directory for c in current):
        return True
    package_hash = sources_hash(directory)
    impl._locator_classes = [_stamped_locator(b, directory, package_hash) for b in bases] + list(current)
    return True


INSTALLED = install()
