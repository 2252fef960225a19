"""Non-temporal (streaming) stores for large outputs: write y and dx without reading them.

A plain store to a line that is not in cache first reads the line (read-for-ownership),
so an elementwise kernel whose output misses the cache moves three bytes per output
byte: x in, y in, y out. Streaming stores write whole 32-byte chunks past the caches
(``vmovntps``/``vmovntdq`` on x86). Whether that pays depends on whether the output
would have stayed in cache, so on the size, the layout and how busy the shared L3 is.
Measured on the 2-core VM (32 MB L3 shared with other jobs; old and new kernels in one
process, BENCHMARKS.md), float32 forward, streamed vs plain:

    channels-last  8 MiB: 0.87x quiet, 1.59x loaded;  10 MiB: 1.26x quiet, 1.53x loaded
    contiguous     8 MiB: 0.74x quiet, 0.99x loaded;  10 MiB: 0.84x quiet, 1.13x loaded
    both          30 MiB: 1.14-1.40x;  128 MiB: 1.07x;  bfloat16 outputs: 0.9-1.1x

(the channels-last forward re-reads x after its statistics pass, the contiguous one
re-reads each group from L2, so channels-last outputs leave the cache sooner; half types
are bound by their conversions, not by memory). A tight loop of one kernel is the quiet
case at its best: in the benchmark, where ATen's call runs between two of ours as other
layers do in a model, the 8 MiB channels-last float32 forward was 1.06-1.17x of ATen
streamed and 0.66-1.26x plain (four runs). So the launcher streams float32/float64
outputs of at least 8 MiB channels-last and 16 MiB contiguous (input and output then
exceed the whole L3), or a quarter of the last-level cache where that is larger (below).
The backward's dx streams from 8 MiB in both layouts: its passes
read dy as well as x, and two benchmark runs each way gave the 8-10 MiB float32 backward
rows 1.04-1.64x of ATen streamed against 0.72-1.08x plain.

Kernels compute a span into a small scratch of the output's element type (the same
rounding as a direct store), then ``stream_span`` copies it: plain stores up to the
first 32-byte boundary and after the last, streaming stores between. A task that
streamed ends with ``store_fence`` so its writes are visible before the parallel region
joins. The values written are the same bits either way, so the choice never changes a
result. LLVM emits scalar non-temporal stores when it cannot prove alignment, which is
why the vector type and alignment are spelled out here.

The choice is made at compile time. Kernels take ``stream`` as None (plain stores) or
True, and test it with ``stream is not None``: Numba prunes that branch by the argument's
type before typing, so a signature with None never compiles the streamed twins (as a
run-time bool it compiled them into every entry: 522 s of first-call compile against
385 s before streaming), and one with True compiles only them. ``launch.streams`` gives
the value to pass.
"""
from __future__ import annotations

import os
import platform

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}   # sysfs cache sizes: "491520K"


def last_level_cache_bytes(cpu_dir: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """Size of the highest cache level the kernel reports for CPU 0 (Linux sysfs); 0 when
    unknown (other systems, or a VM that reports none)."""
    best_level, best_size = 0, 0
    try:
        entries = sorted(os.listdir(cpu_dir))
    except OSError:
        return 0
    for entry in entries:
        if not entry.startswith("index"):
            continue
        try:
            with open(os.path.join(cpu_dir, entry, "level")) as f:
                level = int(f.read())
            with open(os.path.join(cpu_dir, entry, "size")) as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        size = int(text[:-1]) * _SIZE_UNITS[text[-1]] if text[-1:] in _SIZE_UNITS else int(text or 0)
        if level > best_level or (level == best_level and size > best_size):
            best_level, best_size = level, size
    return best_size


# The forward streams only outputs larger than a quarter of the last-level cache: on the
# AMD VM above (32 MB L3) that leaves the measured 16 / 8 MiB limits as they were; on a
# 2-core Xeon VM whose L3 reports 480 MB (measured 2026-11-27 at d7f7539), streaming the
# 8-31 MiB float32 forwards was 10-30% slower than plain stores and the 128 MiB one 13%
# faster. The backward's limit stays: there the 19-31 MiB float32 rows gained from it.
LAST_LEVEL_CACHE_BYTES = last_level_cache_bytes()
STREAM_MIN_BYTES = max(16 << 20, LAST_LEVEL_CACHE_BYTES // 4)               # contiguous outputs from this size are streamed ...
STREAM_MIN_BYTES_CHANNELS_LAST = max(8 << 20, LAST_LEVEL_CACHE_BYTES // 4)  # ... channels-last from this (see above) ...
STREAM_MIN_BYTES_BACKWARD = 8 << 20        # ... dx of the backward from this ...
STREAM_MIN_ITEMSIZE = 4                    # ... if their elements have at least this many bytes
CHUNK_BYTES = 32             # one AVX store
X86 = platform.machine().lower() in ("x86_64", "amd64")
# Elsewhere the launcher never asks for streaming; GROUPNORM_STREAMING=0 turns it off (for
# a model whose next layer would find a mid-size output still in a large cache).
STREAMS = X86 and os.environ.get("GROUPNORM_STREAMING", "1") != "0"


@intrinsic
def element_address(typingctx, arr, i):
    """The address of element i of a C-contiguous array's memory, as an integer."""
    if not isinstance(arr, types.Array) or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.ptrtoint(builder.gep(array.data, [args[1]]), ir.IntType(64))

    return types.int64(arr, i), codegen


@intrinsic
def stream_chunk(typingctx, dst, i, src, j):
    """The 32 bytes of src from element j on, stored non-temporally to dst from element i
    on (that address must be 32-byte aligned). dst, src: C-contiguous, same dtype."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array)):
        return None

    def codegen(context, builder, signature, args):
        dst_arr = context.make_array(signature.args[0])(context, builder, args[0])
        src_arr = context.make_array(signature.args[2])(context, builder, args[2])
        chunk = ir.VectorType(ir.IntType(64), CHUNK_BYTES // 8)
        value = builder.load(builder.bitcast(builder.gep(src_arr.data, [args[3]]), chunk.as_pointer()), align=1)
        store = builder.store(value, builder.bitcast(builder.gep(dst_arr.data, [args[1]]), chunk.as_pointer()),
                              align=CHUNK_BYTES)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.void(dst, i, src, j), codegen


@intrinsic
def store_fence(typingctx):
    """Order this thread's streaming stores before anything it does next (x86 sfence)."""
    def codegen(context, builder, signature, args):
        if X86:
            fence = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                   "llvm.x86.sse.sfence")
            builder.call(fence, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@njit(cache=True, error_model="numpy", boundscheck=False, fastmath=False)
def stream_span(dst, start, src, count):
    """dst[start:start + count] = src[:count] (1-D, same dtype): streaming stores on
    the 32-byte-aligned middle, plain stores at the ends."""
    per = CHUNK_BYTES // dst.itemsize
    head = ((-element_address(dst, start)) & (CHUNK_BYTES - 1)) // dst.itemsize
    head = min(head, count)
    for i in range(head):
        dst[start + i] = src[i]
    i = head
    while i + per <= count:
        stream_chunk(dst, start + i, src, i)
        i += per
    for k in range(i, count):
        dst[start + k] = src[k]
