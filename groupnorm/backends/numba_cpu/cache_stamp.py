"""Numba's on-disk cache, invalidated by a change to any module of this package.

Numba stamps each cached function with its own source file only, but our kernels inline
helpers from sibling modules (elements, bits, coefs, activations, ...). After an edit to
a helper, a kernel in an unchanged file would load the old machine code from the cache
and silently run the old helper. The locators installed here add one hash over every
module of this package to each kernel's stamp, so any edit recompiles all of them once.

The cache files of these kernels are also written so that concurrent processes (two
pytest-xdist workers, several ranks of a CPU job compiling at once) and stale files can
never hand a kernel another signature's machine code; see ``KeyedCacheFile``.

Installed from the package's ``__init__`` before any kernel module is imported: Numba
chooses a function's locator when the function is decorated. Functions outside this
package keep Numba's own locators and cache files. Where a Numba version lacks the hooks
used here (``CacheImpl._locator_classes`` and its locator classes, ``IndexDataCacheFile``),
nothing is installed and Numba's own behaviour applies, as before.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os

from numba.core import caching

try:
    import fcntl
except ImportError:   # Windows: no index lock (a lost index entry costs a recompile, never a wrong load)
    fcntl = None

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


_PACKAGE_HASHES: set = set()   # the package hashes our locators put into stamps


def _is_ours(source_stamp) -> bool:
    return isinstance(source_stamp, tuple) and len(source_stamp) == 2 and source_stamp[1] in _PACKAGE_HASHES


def _keyed_cache_file(base: type) -> type:
    """``base`` (Numba's IndexDataCacheFile), writing this package's kernels safely.

    Numba numbers a function's data files 1, 2, ... and writes the index entry before the
    data. Between the two another process can load the entry and read whatever that file
    held: another signature's code, or the code of an older source version (after an edit
    the stamp changes but the old numbered files stay and are reused). A kernel then runs
    machine code compiled for other argument types: wrong results or a crash. Here the
    data file is named after the stamp and the index key, written first (atomically, as
    Numba writes), and only then entered in the index, under a file lock; files of older
    stamps are removed. An index entry therefore only ever names its own code. Other
    functions keep Numba's behaviour unchanged.
    """

    class KeyedCacheFile(base):
        def __init__(self, cache_path, filename_base, source_stamp):
            super().__init__(cache_path, filename_base, source_stamp)
            self._groupnorm = _is_ours(source_stamp) and all(
                isinstance(getattr(self, n, None), str) for n in ("_index_name", "_index_path", "_cache_path"))
            if self._groupnorm:
                stamp_tag = hashlib.sha256(repr(source_stamp).encode()).hexdigest()[:12]
                self._name_base = self._index_name[:-len(".nbi")]   # the function's file-name base
                self._stamp_prefix = f"{self._name_base}.g{stamp_tag}-"   # its data files under this stamp

        def keyed_name(self, key) -> str:
            """The data file of ``key`` under this stamp."""
            return f"{self._stamp_prefix}{hashlib.sha256(repr(key).encode()).hexdigest()[:20]}.nbc"

        def save(self, key, data):
            if not self._groupnorm:
                return super().save(key, data)
            name = self.keyed_name(key)
            self._save_data(name, data)
            with _file_lock(self._index_path + ".lock"):
                overloads = self._load_index()
                overloads[key] = name
                self._save_index(overloads)
            self._remove_stale_data()

        def _remove_stale_data(self):
            """Data files of this function under another stamp (or Numba's numbered
            names): never loaded again, and the next edit would otherwise add a set."""
            pattern = os.path.join(glob.escape(self._cache_path), glob.escape(self._name_base) + ".*.nbc")
            for path in glob.glob(pattern):
                if not os.path.basename(path).startswith(self._stamp_prefix):
                    try:
                        os.remove(path)
                    except OSError:
                        pass

    KeyedCacheFile.__name__ = "Keyed" + base.__name__
    return KeyedCacheFile


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive flock on ``path`` for a with-block (no lock where fcntl is missing)."""
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


NUMBA_CACHE_FILE = getattr(caching, "IndexDataCacheFile", None)   # Numba's own, before install


def _cache_file_hook():
    """Numba's IndexDataCacheFile made keyed (see _keyed_cache_file), or None where this
    Numba lacks the methods it builds on."""
    base = getattr(caching, "IndexDataCacheFile", None)
    if base is None or getattr(base, "groupnorm_keyed", False):
        return base
    if not all(callable(getattr(base, n, None)) for n in ("save", "load", "_load_index", "_save_index", "_save_data")):
        return None
    keyed = _keyed_cache_file(base)
    keyed.groupnorm_keyed = True
    return keyed


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
    keyed = _cache_file_hook()
    if keyed is not None:
        caching.IndexDataCacheFile = keyed   # looked up by Cache.__init__ per function
    _PACKAGE_HASHES.add(package_hash)
    impl._locator_classes = [_stamped_locator(b, directory, package_hash) for b in bases] + list(current)
    return True


INSTALLED = install()
