"""Streaming (non-temporal) stores: the same bits as plain stores, every element written.

The launcher streams only large outputs (the limits in streaming); these tests lower the
threshold so small shapes take the streamed code, and compare it with the plain one on
the same inputs (outputs NaN-poisoned first) and with the float64 reference.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("numba")

from groupnorm import reference  # noqa: E402
from groupnorm.backends import numba_cpu  # noqa: E402
from groupnorm.backends.numba_cpu import forward_kernels, launch, streaming  # noqa: E402
from test_numba_backend import ATOL, f64, make_params, make_x, poisoned_outputs, same_layout  # noqa: E402,F401

pytestmark = pytest.mark.skipif(not streaming.STREAMS, reason="streaming stores are x86 only")

# (shape, groups, channels_last): contiguous with N*G >= 8 (one task per group) and with
# few groups (row tasks), rows longer than a streamed piece (2250 > STREAM_SPAN) and odd
# rows (unaligned piece starts); channels-last with C a multiple of 8 and odd C, and 5-D.
CASES = [
    ((2, 12, 50, 45), 4, False),
    ((1, 6, 17, 23), 3, False),
    ((2, 64, 9, 7), 8, True),
    ((1, 600, 5, 7), 4, True),
    ((2, 10, 3, 4, 5), 2, True),
]


def _run(monkeypatch, stream, fn, *args):
    monkeypatch.setattr(streaming, "STREAM_MIN_BYTES", 0 if stream else 1 << 62)
    monkeypatch.setattr(streaming, "STREAM_MIN_BYTES_CHANNELS_LAST", 0 if stream else 1 << 62)
    monkeypatch.setattr(streaming, "STREAM_MIN_BYTES_BACKWARD", 0 if stream else 1 << 62)
    monkeypatch.setattr(streaming, "STREAM_MIN_ITEMSIZE", 0)   # half types too
    monkeypatch.setattr(forward_kernels, "SAMPLE_TASK_MAX", 0)   # channels-last: the pixel-block path
    return fn(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,groups,cl", CASES)
@pytest.mark.parametrize("act,scaled", [("none", False), ("silu", True)])
def test_streamed_forward_equals_plain(monkeypatch, shape, groups, cl, dtype, act, scaled):
    x = make_x(shape, dtype, cl, seed=5)
    w, b, s, t = make_params(shape[1], shape[0], dtype, scaled=scaled, seed=6)
    args = (x, w, b, s, t, groups, 1e-5, act)
    plain = _run(monkeypatch, False, numba_cpu.forward, *args)
    streamed = _run(monkeypatch, True, numba_cpu.forward, *args)
    same_layout(streamed[0], x)
    assert not torch.isnan(streamed[0]).any()
    for got, want in zip(streamed, plain):
        assert torch.equal(got, want)
    ry = reference.forward(x.double(), f64(w), f64(b), f64(s), f64(t), groups, 1e-5, act)[0]
    torch.testing.assert_close(streamed[0].double(), ry, atol=2 * ATOL[dtype], rtol=0)
    mean, rstd = plain[1], plain[2]
    applied = _run(monkeypatch, True, numba_cpu.apply, x, mean, rstd, w, b, s, t, groups, act)
    assert torch.equal(applied, _run(monkeypatch, False, numba_cpu.apply, x, mean, rstd, w, b, s, t, groups, act))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,groups,cl", CASES)
@pytest.mark.parametrize("act,scaled", [("none", False), ("mish", True)])
def test_streamed_backward_equals_plain(monkeypatch, shape, groups, cl, dtype, act, scaled):
    """The one-call backward (every entry: per group, two-stage rows, channels-last) and
    the two-stage backward_dx, streamed and plain."""
    x = make_x(shape, dtype, cl, seed=9)
    dy = make_x(shape, dtype, cl, seed=10)
    w, b, s, t = make_params(shape[1], shape[0], dtype, scaled=scaled, seed=11)
    _, mean, rstd = numba_cpu.forward(x, w, b, s, t, groups, 1e-5, act)
    args = (dy, x, mean, rstd, w, b, s, t, groups, act)
    plain = _run(monkeypatch, False, numba_cpu.backward_grads, *args)
    streamed = _run(monkeypatch, True, numba_cpu.backward_grads, *args)
    same_layout(streamed[0], x)
    assert not torch.isnan(streamed[0]).any()
    for got, want in zip(streamed, plain):
        assert (got is None and want is None) or torch.equal(got, want)
    xd, md, rd = x.double(), mean.double(), rstd.double()
    params = (f64(w), f64(b), f64(s), f64(t))
    rs1, rs0 = reference.backward_reduce(dy.double(), xd, md, rd, *params, groups, act)
    gain = torch.ones_like(rs1)
    if s is not None:
        gain = gain * (1 + s.double())
    if w is not None:
        gain = gain * w.double()
    g1 = (rs0 * gain).view(shape[0], groups, -1).sum(-1)
    g2 = (rs1 * gain).view(shape[0], groups, -1).sum(-1)
    count = x.numel() // (shape[0] * groups)
    rdx = reference.backward_dx(dy.double(), xd, md, rd, *params, g1, g2, count, groups, act)
    torch.testing.assert_close(streamed[0].double(), rdx, atol=4 * ATOL[dtype], rtol=4 * ATOL[dtype])
    dx_args = args[:-2] + (g1.to(mean.dtype), g2.to(mean.dtype), count, groups, act)
    dx = _run(monkeypatch, True, numba_cpu.backward_dx, *dx_args)
    assert not torch.isnan(dx).any()
    assert torch.equal(dx, _run(monkeypatch, False, numba_cpu.backward_dx, *dx_args))


def _limits_for_a_32_mib_cache(monkeypatch):
    """The limits as they come out on a CPU whose last-level cache is 32 MiB or less."""
    monkeypatch.setattr(streaming, "STREAM_MIN_BYTES", max(16 << 20, (32 << 20) // 4))
    monkeypatch.setattr(streaming, "STREAM_MIN_BYTES_CHANNELS_LAST", max(8 << 20, (32 << 20) // 4))


def test_only_large_outputs_stream(monkeypatch):
    """float32/float64 outputs of 8 MiB channels-last, of 16 MiB contiguous; dx from 8 MiB."""
    _limits_for_a_32_mib_cache(monkeypatch)
    eight = torch.empty(1, 8, 512, 512)   # 8 MiB of float32
    ten = torch.empty(2, 5, 512, 512)     # 10 MiB
    sixteen = torch.empty(1, 16, 512, 512)
    assert launch.streams(eight.numel(), eight, True)
    assert not launch.streams(eight.numel() - 1, eight, True)
    assert not launch.streams(eight.numel(), eight, False)
    assert launch.streams(ten.numel(), ten, True)
    assert not launch.streams(ten.numel(), ten, False)
    assert launch.streams(sixteen.numel(), sixteen, False)
    assert launch.streams(ten.numel(), ten.double(), True)
    assert not launch.streams(2 * sixteen.numel(), sixteen.bfloat16(), False)   # 32 MiB of a half type
    assert launch.streams(eight.numel(), eight, False, backward=True)
    assert launch.streams(eight.numel(), eight, True, backward=True)
    assert not launch.streams(eight.numel() // 2, eight, True, backward=True)


def test_streaming_can_be_turned_off():
    """GROUPNORM_STREAMING=0 (read at import) keeps every output on plain stores."""
    code = ("from groupnorm.backends.numba_cpu import launch, streaming; import torch; "
            "big = torch.empty(1, 32, 512, 520); print(streaming.STREAMS, launch.streams(big.numel(), big, True))")
    env = dict(os.environ, GROUPNORM_STREAMING="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "None"]


@pytest.mark.slow   # ~30 s of fresh compiles; a speed property, not a result
def test_plain_calls_compile_no_streamed_code(tmp_path):
    """stream=None prunes the streamed branch before typing (see streaming), so a process
    that never streams never compiles the twins; stream=True compiles them. Run in a fresh
    process with an empty cache: this one has compiled everything, and a kernel loaded
    from the cache brings its callees' code without compiling them."""
    code = """
import numpy as np
from groupnorm.backends.numba_cpu import apply_kernels as ak, backward_kernels as bk, streaming
x = np.random.default_rng(0).standard_normal((6, 40)).astype(np.float32)
y = np.full_like(x, np.nan)
c = np.ones(6, np.float32)
twins = (ak.apply_span_streamed, bk.dx_row_streamed, streaming.stream_span)
ak.apply_rows(x, y, c, c, c, 0, None)
bk.dx_rows(x, x, y, c, c, c, c, c, 0, None)
print(sum(len(f.signatures) for f in twins), int(np.isnan(y).sum()))
ak.apply_rows(x, y, c, c, c, 0, True)
bk.dx_rows(x, x, y, c, c, c, c, c, 0, True)
print(len(ak.apply_span_streamed.signatures), len(bk.dx_row_streamed.signatures))
"""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "0", "1", "1"]


def test_forward_limits_follow_the_last_level_cache(tmp_path):
    """A quarter of the largest reported cache level, never below the 16 / 8 MiB limits."""
    for index, (level, size) in enumerate([(1, "48K"), (2, "2048K"), (3, "491520K"), (2, "1M")]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "level").write_text(f"{level}\n")
        (tmp_path / f"index{index}" / "size").write_text(f"{size}\n")
    (tmp_path / "uevent").write_text("")
    assert streaming.last_level_cache_bytes(str(tmp_path)) == 480 << 20
    assert streaming.last_level_cache_bytes(str(tmp_path / "missing")) == 0
    cache = streaming.LAST_LEVEL_CACHE_BYTES
    assert streaming.STREAM_MIN_BYTES == max(16 << 20, cache // 4)
    assert streaming.STREAM_MIN_BYTES_CHANNELS_LAST == max(8 << 20, cache // 4)
    assert streaming.STREAM_MIN_BYTES_BACKWARD == 8 << 20


def test_large_forward_through_the_api_matches_torch(monkeypatch):
    """At a 32 MiB cache's limits: a float32 channels-last input of 10 MiB streams."""
    _limits_for_a_32_mib_cache(monkeypatch)
    g = torch.Generator().manual_seed(8)
    x = (0.7 + torch.randn(1, 40, 256, 260, generator=g)).to(memory_format=torch.channels_last)
    w = torch.randn(40, generator=g)
    b = torch.randn(40, generator=g)
    assert launch.streams(x.numel(), x, True)
    y = numba_cpu.forward(x, w, b, None, None, 8, 1e-5, "none")[0]
    same_layout(y, x)
    torch.testing.assert_close(y, F.group_norm(x, 8, w, b, 1e-5), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
def test_stream_span_writes_exactly_its_span(dtype):
    """Every start offset within a 32-byte chunk and counts below, at and over a chunk:
    the span equals the source, the elements around it keep their sentinel."""
    per = streaming.CHUNK_BYTES // np.dtype(dtype).itemsize
    base = torch.zeros(8 * per, dtype=torch.int64).numpy().view(dtype)   # 64-byte aligned
    src = (np.arange(5 * per) + 1).astype(dtype)
    for start in range(per + 1):
        for count in (0, 1, per - 1, per, per + 1, 3 * per + 2):
            dst = np.zeros_like(base)
            streaming_span(dst, start, src, count)
            assert np.array_equal(dst[start:start + count], src[:count])
            assert not dst[:start].any() and not dst[start + count:].any()


def streaming_span(dst, start, src, count):
    streaming.stream_span(dst, start, src, count)
