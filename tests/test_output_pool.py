"""The CPU backend's output pool: a buffer is reused only after every tensor on it died,
never shared between live tensors, bounded, and invisible in results."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

import groupnorm  # noqa: E402
from helpers import assert_fwd_bwd_matches_torch  # noqa: E402
from groupnorm.backends.numba_cpu import alloc  # noqa: E402
from groupnorm.backends.numba_cpu.output_pool import OutputPool  # noqa: E402

SHAPE = (2, 64, 32, 32)          # 512 KiB of float32: below alloc.POOL_MIN_BYTES
POOLED = (2, 128, 32, 48)        # 1.5 MiB of float32: pooled


@pytest.fixture
def pool(monkeypatch):
    """A fresh, private pool for the test (alloc's functions use it)."""
    p = OutputPool(64 << 20, new_buffer=alloc._new_pool_buffer)
    monkeypatch.setattr(alloc, "POOL", p)
    return p


def _like(shape, dtype=torch.float32, channels_last=False):
    x = torch.empty(shape, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_output_like_layout_and_flat_view(pool, dtype, channels_last):
    x = _like(POOLED, dtype, channels_last)
    y, flat = alloc.output_like(x, channels_last)
    assert (y.shape, y.stride(), y.dtype) == (x.shape, x.stride(), x.dtype)
    assert y.data_ptr() % 64 == 0 and flat.ctypes.data == y.data_ptr() and flat.size == x.numel()
    # The flat view is the memory in memory order: write a ramp there, read it through y.
    ramp = torch.arange(x.numel(), dtype=torch.float64).remainder(251).to(dtype)
    flat[:] = alloc.memory_order(ramp, False)
    in_memory_order = y.permute(0, 2, 3, 1) if channels_last else y
    assert torch.equal(in_memory_order.reshape(-1), ramp)


@pytest.mark.parametrize("shape", [(2, 1, 1024, 384), (2, 1536, 1, 256), (2, 384, 1024, 1)])
def test_output_keeps_the_strides_of_size_one_dims(pool, shape):
    """x dense with a size-1 dim: any stride is valid there; the output copies x's, as
    torch.empty_like does (both layouts, pooled sizes)."""
    for x in (_like(shape), _like(shape).to(memory_format=torch.channels_last),
              _like(shape).as_strided(shape, _odd_strides(shape))):
        channels_last = not x.is_contiguous()
        y, flat = alloc.output_like(x, channels_last)
        assert y.stride() == x.stride() and pool.pooled_bytes > 0
        flat[:] = np.arange(flat.size, dtype=np.float32)
        want = torch.arange(flat.size, dtype=torch.float32)
        in_memory_order = y.permute(0, 2, 3, 1) if channels_last else y
        assert torch.equal(in_memory_order.reshape(-1), want)


def _odd_strides(shape):
    """Contiguous strides, except 12345 for each size-1 dim."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(12345 if size == 1 else step)
        step *= size
    return tuple(reversed(strides))


def test_reused_only_after_every_reference_died(pool):
    x = _like(POOLED)
    y, _ = alloc.output_like(x, False)
    first = y.data_ptr()
    keep = [y[1], y.numpy(), y.view(-1)[5:]]        # a view, a numpy array, a slice
    del y
    for holder in range(len(keep)):
        z, _ = alloc.output_like(x, False)
        assert z.data_ptr() != first, f"reused while {type(keep[0]).__name__} alive"
        del z
        keep.pop(0)   # the last one gone: first is the last freed
    z, _ = alloc.output_like(x, False)
    assert z.data_ptr() == first


def test_last_freed_is_reused_first(pool):
    x = _like(POOLED)
    a, _ = alloc.output_like(x, False)
    b, _ = alloc.output_like(x, False)
    pa, pb = a.data_ptr(), b.data_ptr()
    del a
    del b
    c, _ = alloc.output_like(x, False)
    assert c.data_ptr() == pb and pa != pb


def test_a_free_buffer_serves_another_dtype_of_the_same_size(pool):
    """Free lists are kept by size and element type; a float32 buffer that came back serves
    a bfloat16 output of the same byte size instead of growing the pool, and the tensor
    on it reads back what the kernels' flat view (uint16 bits) holds."""
    x32 = _like(POOLED)
    y, _ = alloc.output_like(x32, False)
    first = y.data_ptr()
    del y
    x16 = _like((2 * POOLED[0],) + POOLED[1:], torch.bfloat16)
    assert x16.numel() * 2 == x32.numel() * 4
    z, flat = alloc.output_like(x16, False)
    assert z.data_ptr() == first and pool.pooled_bytes == x32.numel() * 4
    assert flat.dtype == np.uint16 and z.dtype == torch.bfloat16 and z.shape == x16.shape
    want = torch.randn(x16.shape).to(torch.bfloat16)
    flat[:] = want.view(torch.int16).numpy().reshape(-1).view(np.uint16)
    assert torch.equal(z, want)
    del z
    again, flat32 = alloc.output_like(x32, False)    # and back to float32
    assert again.data_ptr() == first and flat32.dtype == np.float32 and pool.pooled_bytes == x32.numel() * 4


def test_live_outputs_never_share_memory(pool):
    x = _like(POOLED)
    outs = []
    for i in range(pool.per_size + 3):      # past per_size: plain allocations
        y, flat = alloc.output_like(x, False)
        flat.view(np.uint8)[:] = i
        outs.append(y)
    assert len({y.data_ptr() for y in outs}) == len(outs)
    for i, y in enumerate(outs):
        assert bool((y.view(torch.uint8) == i).all())
    assert pool.pooled_bytes == pool.per_size * x.numel() * 4


def test_limit_evicts_free_buffers_of_other_sizes(monkeypatch):
    p = OutputPool(4 << 20, new_buffer=alloc._new_pool_buffer)
    monkeypatch.setattr(alloc, "POOL", p)
    small = _like((1, 256, 32, 32))       # 1 MiB
    large = _like((3, 256, 32, 32))       # 3 MiB
    a, _ = alloc.output_like(small, False)
    b, _ = alloc.output_like(small, False)
    assert p.pooled_bytes == 2 << 20
    c, _ = alloc.output_like(large, False)   # 5 MiB > 4 MiB, nothing free: not pooled
    assert p.pooled_bytes == 2 << 20 and (3 << 20) not in p._count
    del a, b, c
    d, _ = alloc.output_like(large, False)   # evicts the free 1 MiB buffers
    assert p.pooled_bytes == 4 << 20 and p._count == {1 << 20: 1, 3 << 20: 1}   # one was enough
    del d
    assert p.free_buffers() == 2


def test_release_drops_free_buffers_only(pool):
    x = _like(POOLED)
    a, _ = alloc.output_like(x, False)
    b, _ = alloc.output_like(x, False)
    nbytes = x.numel() * 4
    del a
    assert pool.free_buffers() == 1
    assert groupnorm.release_cached_memory() == nbytes   # the public name
    assert pool.free_buffers() == 0 and pool.pooled_bytes == nbytes
    del b                                    # comes back to the pool when it dies
    assert pool.free_buffers() == 1


def test_small_outputs_are_not_pooled(pool):
    y, flat = alloc.output_like(_like(SHAPE), False)
    assert pool.pooled_bytes == 0 and flat.ctypes.data == y.data_ptr()


def test_threads_never_get_the_same_buffer(pool):
    x = _like(POOLED)
    errors = []

    def work(tag):
        for _ in range(200):
            y, flat = alloc.output_like(x, False)
            flat.view(np.uint8)[::4096] = tag
            if not bool((y.view(torch.uint8).view(-1)[::4096] == tag).all()):
                errors.append(tag)

    threads = [threading.Thread(target=work, args=(t,)) for t in (1, 2, 3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pool.pooled_bytes <= pool.per_size * x.numel() * 4


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_results_do_not_depend_on_reuse(pool, channels_last):
    """Repeated forward + backward on fresh inputs reuse the buffers (stale contents from
    the previous call): every call must still equal torch."""
    g = torch.Generator().manual_seed(11)
    for step in range(3):
        x = (1.5 + torch.randn(POOLED, generator=g))
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_()
        w = torch.randn(POOLED[1], generator=g, requires_grad=True)
        b = torch.randn(POOLED[1], generator=g, requires_grad=True)
        dy = torch.randn(POOLED, generator=g)
        y, got, _ = assert_fwd_bwd_matches_torch(groupnorm.group_norm, x, 8, w, b, dy)
        assert y.stride() == x.stride() and got[0].stride() == x.stride()
        del y, got
    assert pool.pooled_bytes > 0 and pool.free_buffers() >= 1


def test_pool_can_be_turned_off():
    code = ("import torch; from groupnorm.backends.numba_cpu import alloc; "
            "y, _ = alloc.output_like(torch.empty(2, 128, 32, 48), False); "
            "print(alloc.POOL.limit_bytes, alloc.POOL.pooled_bytes)")
    env = dict(os.environ, GROUPNORM_OUTPUT_POOL_MB="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "0"]
