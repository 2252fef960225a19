"""Tensors passed to Numba as raw addresses (numba_cpu.addresses) see the tensor's memory."""
import numpy as np
import pytest
import torch
from numba import njit

from groupnorm.backends.numba_cpu.addresses import WITNESS, array_at, tensor_at
from groupnorm.backends.numba_cpu.numpy_views import as_numpy, memory_order

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@njit(cache=False)
def _copy_at(src_at, dst_at, size, like):
    src = array_at(src_at, size, like)
    dst = array_at(dst_at, size, like)
    for i in range(size):
        dst[i] = src[i]


@njit(cache=False)
def _read_at(address, size, like):
    return array_at(address, size, like).copy()


@pytest.mark.parametrize("dtype", DTYPES)
def test_array_at_reads_the_same_bits_as_the_numpy_view(dtype):
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = _read_at(*tensor_at(x))
    want = as_numpy(x).reshape(-1)
    assert got.dtype == want.dtype == type(WITNESS[dtype])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_writes_through_an_address_land_in_the_tensor(dtype):
    src = torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(2)).to(dtype)
    src = src.to(memory_format=torch.channels_last)[1:]        # an offset, channels-last view
    dst = torch.full_like(src, float("nan"))
    _copy_at(src.data_ptr(), dst.data_ptr(), src.numel(), WITNESS[dtype])
    assert torch.equal(dst, src)
    np.testing.assert_array_equal(memory_order(dst, True), memory_order(src, True))


def test_zero_elements_at_address_zero_is_an_empty_array():
    assert _read_at(0, 0, WITNESS[torch.float32]).size == 0
