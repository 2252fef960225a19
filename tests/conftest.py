"""Test-wide setup: Triton kernels run on CPU tensors through the interpreter when no GPU."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported anywhere in the session.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    """Each pytest-xdist worker compiles into a Numba cache of its own.

    Why: a process that compiles a kernel while loading some of its callees from a cache
    another process wrote can get other last bits from the same reassociated sums
    (measured in the thirteenth session: the fused and the two-stage bfloat16 Mish
    backward sums differed when one path was compiled beside the other's cached callees,
    and agreed whenever both were compiled in one process; reproduced on the code before
    that session too). With one cache per worker, a cold run (CI: a fresh clone) compiles
    every kernel of a worker in that worker, as one process would. Set before any test
    module imports Numba (the cache directory is read when a kernel is decorated).
    """
    worker = getattr(config, "workerinput", {}).get("workerid")
    if worker is not None and "NUMBA_CACHE_DIR" not in os.environ:
        root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache")
        os.environ["NUMBA_CACHE_DIR"] = os.path.join(root, f"numba-{worker}")
