"""Reliability of the CPU backend: fork, threads, numerics at the edges, batch invariance,
bounded memory, and fallbacks where Numba internals move (docs/reliability.md).

The fork and thread cases run in a child Python, so a child killed by a signal (the
GNU OpenMP layer's fork guard, the workqueue layer's concurrency abort) fails the test
instead of killing pytest.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import groupnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(*parts: str, env: dict | None = None, timeout: int = 600) -> str:
    """Run the code parts (each dedented) in a fresh interpreter from the repository root -> its stdout; fails the
    test, with both streams, on a non-zero exit or a death by signal."""
    full_env = dict(os.environ, PYTHONPATH=ROOT)
    full_env.pop("NUMBA_THREADING_LAYER", None)
    full_env.update(env or {})
    done = subprocess.run([sys.executable, "-c", "".join(textwrap.dedent(p) for p in parts)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


# ---- fork and threads ---------------------------------------------------------------

# A parent call large enough to run on every thread (threads.SERIAL_BELOW), then the work.
PARALLEL_FIRST = """
import os, torch, groupnorm
torch.manual_seed(0)
big = torch.randn(4, 64, 32, 32) + 3.0
parent = groupnorm.group_norm(big, 8)
assert torch.allclose(parent, torch.nn.functional.group_norm(big, 8), atol=1e-5)
"""


def test_dataloader_fork_workers_after_a_parent_call():
    """DataLoader workers started by fork, after a multi-threaded call in the parent, run
    group_norm and give the parent's bits (the GNU OpenMP layer killed them)."""
    out = run_python(PARALLEL_FIRST, """
    from torch.utils.data import DataLoader, Dataset

    class Normed(Dataset):
        def __len__(self):
            return 6
        def __getitem__(self, i):
            return groupnorm.group_norm(big[i % 4:i % 4 + 1], 8)[0], i % 4

    loader = DataLoader(Normed(), batch_size=2, num_workers=2, multiprocessing_context="fork")
    seen = 0
    for y, idx in loader:
        for k in range(y.shape[0]):
            assert torch.equal(y[k], parent[idx[k]]), int(idx[k])
            seen += 1
    print("seen", seen)
    """)
    assert "seen 6" in out


def test_raw_fork_after_a_multithreaded_call():
    """os.fork() after a parallel call: the child runs group_norm (forward and backward)
    and matches the parent bitwise; the parent keeps working after the child exits."""
    out = run_python(PARALLEL_FIRST, """
    x = big.clone().requires_grad_()
    groupnorm.group_norm(x, 8).sum().backward()
    parent_grad = x.grad.clone()
    pid = os.fork()
    if pid == 0:
        y = groupnorm.group_norm(big, 8)   # on Numba's threads, as many as in the parent
        # torch's own ops hang in a child forked after a parallel torch op (GNU OpenMP)
        # unless it runs on one thread, as DataLoader workers do
        torch.set_num_threads(1)
        ok = torch.equal(y, parent)
        xc = big.clone().requires_grad_()
        groupnorm.group_norm(xc, 8).sum().backward()
        ok = ok and torch.equal(xc.grad, parent_grad)
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"child killed: status {status}"
    assert os.WEXITSTATUS(status) == 0, "child's results differ"
    assert torch.equal(groupnorm.group_norm(big, 8), parent)
    print("fork ok")
    """)
    assert "fork ok" in out


def test_threads_give_the_serial_bits():
    """8 Python threads x 50 calls of mixed shapes, layouts and dtypes, forward and
    backward, give bitwise the results of the same calls made one after another (the
    workqueue layer aborts the process on concurrent parallel regions: threads.LOCK)."""
    out = run_python("""
    import threading, torch, groupnorm
    torch.manual_seed(1)
    cases = []
    for shape, g in [((8, 64, 32, 32), 8), ((4, 32, 16, 16), 4), ((2, 128, 8, 8), 32), ((16, 32, 9, 7), 8),
                     ((3, 12, 5), 3), ((64, 1024), 32)]:
        for cl in (False, True):
            for dtype in (torch.float32, torch.float64):
                x = (torch.randn(shape) * 2 + 1).to(dtype)
                if cl and len(shape) == 4:
                    x = x.to(memory_format=torch.channels_last)
                w = torch.randn(shape[1], dtype=dtype)
                cases.append((x, g, w))

    def run(case):
        x, g, w = case
        xg = x.clone().requires_grad_()
        y = groupnorm.group_norm(xg, g, w, w)
        y.backward(torch.ones_like(y))
        return y.detach(), xg.grad

    serial = [run(c) for c in cases]
    bad = []

    def worker(k):
        for i in range(50):
            j = (7 * k + i) % len(cases)
            y, dx = run(cases[j])
            if not (torch.equal(y, serial[j][0]) and torch.equal(dx, serial[j][1])):
                bad.append(j)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("bad", len(bad))
    """)
    assert "bad 0" in out


def test_set_num_threads_one_is_honoured():
    """Under torch.set_num_threads(1) every call runs on one Numba thread, the pool's
    start leaves torch's setting alone, and the bits equal a multi-threaded run."""
    out = run_python("""
    import torch, numba, groupnorm
    torch.set_num_threads(1)
    x = torch.randn(4, 64, 32, 32) + 2
    y1 = groupnorm.group_norm(x, 8)
    assert torch.get_num_threads() == 1
    assert numba.get_num_threads() == 1
    torch.set_num_threads(2)
    y2 = groupnorm.group_norm(x, 8)
    assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
    assert torch.equal(y1, y2)
    print("layer", numba.threading_layer())
    """)
    assert "layer workqueue" in out or "layer tbb" in out


def test_a_users_layer_choice_is_respected():
    """NUMBA_THREADING_LAYER set by the user wins over our fork-safe choice."""
    out = run_python("""
    import torch, numba, groupnorm
    groupnorm.group_norm(torch.randn(4, 64, 32, 32), 8)
    print("layer", numba.threading_layer())
    """, env={"NUMBA_THREADING_LAYER": "omp"})
    assert "layer omp" in out
