"""Large outputs on their own huge-page mapping: right layout, fully written, freed with the tensor."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

pytest.importorskip("numba")

import groupnorm  # noqa: E402
from helpers import assert_fwd_bwd_matches_torch  # noqa: E402
from groupnorm.backends.numba_cpu import alloc  # noqa: E402
from groupnorm.backends.numba_cpu.output_pool import OutputPool  # noqa: E402

# Just over glibc's 32 MiB mmap threshold in float32: (1, 8, 1024, 1040) = 34 MB.
BIG = (1, 8, 1024, 1040)

pytestmark = pytest.mark.skipif(not alloc._HUGE_PAGES_USABLE, reason="no MADV_HUGEPAGE here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_empty_like_keeps_layout_and_alignment(dtype, channels_last):
    x = torch.empty(BIG if dtype == torch.float32 else (2,) + BIG[1:], dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert x.numel() * x.element_size() >= alloc.HUGE_PAGE_MIN_BYTES
    y = alloc.empty_like(x)
    assert (y.shape, y.stride(), y.dtype) == (x.shape, x.stride(), x.dtype)
    assert y.data_ptr() % (2 << 20) == 0
    y.fill_(3.0)  # writable everywhere
    assert bool((y == 3.0).all())


def test_small_outputs_use_torch_allocator():
    x = torch.empty(2, 32, 64, 64)
    assert alloc.empty_like(x).untyped_storage().resizable()  # torch's own allocation


def test_mapping_released_with_the_tensor():
    y = alloc.huge_page_tensor(alloc.HUGE_PAGE_MIN_BYTES, torch.float32)
    base = y._base if y._base is not None else y
    ref = weakref.ref(base.untyped_storage())
    del y, base
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_on_huge_page_outputs_matches_torch(monkeypatch, channels_last):
    """Forward and backward through new huge-page buffers (a fresh pool), outputs
    poisoned first (all-ones bytes: NaN in every float dtype)."""
    made = []
    real = alloc.huge_page_bytes

    def poisoned(nbytes):
        buf = real(nbytes)
        buf.fill(0xFF)
        made.append(nbytes)
        return buf

    monkeypatch.setattr(alloc, "huge_page_bytes", poisoned)
    monkeypatch.setattr(alloc, "POOL", OutputPool(1 << 30, new_buffer=alloc._new_pool_buffer))
    g = torch.Generator().manual_seed(3)
    x = (1.5 + torch.randn(BIG, generator=g)).requires_grad_()
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(BIG[1], generator=g, requires_grad=True)
    b = torch.randn(BIG[1], generator=g, requires_grad=True)
    dy = torch.randn(BIG, generator=g)
    y, got, ref = assert_fwd_bwd_matches_torch(groupnorm.group_norm, x, 4, w, b, dy)
    assert len(made) == 2  # y and dx came from huge-page mappings
    assert y.stride() == ref.stride() and got[0].stride() == x.stride()
