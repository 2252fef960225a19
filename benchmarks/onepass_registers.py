"""Registers and spills of the one-pass kernels for sm_90, compiled here without a GPU.

    python benchmarks/onepass_registers.py            # the large suite's plans, float16 and float32

Compiles each plan the large suite takes (benchmarks/gpu_large.py LARGE, H100 sizes) with
Triton's own ptxas, as the launcher would specialise it (16-byte divisible pointers and
sizes, the unit stride as a constant), and prints registers, spill bytes and the programs
per SM the registers allow: a plan asking for more than that is refused by the cooperative
launch and retried one step down (onepass_launch), so this is where RESIDENT_PER_SM, the
tiles and ELEMS_PER_THREAD are checked between GPU runs. Uses Triton internals (ASTSource,
GPUTarget): a tool for the Triton installed here, not part of the package.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from groupnorm.backends.triton_gpu import onepass_plan  # noqa: E402
from groupnorm.backends.triton_gpu.onepass_bwd_kernels import onepass_backward_kernel  # noqa: E402
from groupnorm.backends.triton_gpu.onepass_kernels import onepass_forward_kernel  # noqa: E402

SHAPES = [(1, 512, 128, 128), (1, 512, 256, 256), (1, 256, 512, 512), (1, 256, 1024, 1024),
          (1, 128, 17 * 128 * 128)]
DIVISIBLE = {"C", "HW", "G", "stride_n", "stride_c", "stride_hw", "part_stride", "chan_stride", "grp_stride",
             "count"}
SMS, L2 = 132, 50 << 20


def _ptxas() -> str:
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):  # the newer one reads the newest PTX version
        if os.path.exists(os.path.join(bindir, name)):
            return os.path.join(bindir, name)
    raise SystemExit("no ptxas in this Triton")


def compile_regs(fn, dtype: str, consts: dict, num_warps: int, unit_stride: str):
    """(registers, spill store bytes) of fn compiled for sm_90a."""
    consts = dict(consts, **{unit_stride: 1})
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            sig[name] = {"x_ptr": dtype, "y_ptr": dtype, "dy_ptr": dtype, "dx_ptr": dtype,
                         "bar_ptr": "*i32"}.get(name, "*fp32")
        else:
            sig[name] = "fp32" if name == "eps" else "i32"
        if name.endswith("_ptr") or name in DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        out = subprocess.run([_ptxas(), "-v", "--gpu-name=sm_90a", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", out).group(1))
    return regs, spill


def per_sm(regs: int, num_warps: int) -> int:
    """Programs per SM the registers allow (65536 per SM, allocated in steps of 8 per thread)."""
    threads = 32 * num_warps
    return min(65536 // (-(-regs // 8) * 8 * threads), 2048 // threads)


def main() -> int:
    print("| dtype | pass | layout | shape | tile | warps | K | merge | registers | spill B | per SM |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    seen = set()
    for dtype, size in (("*fp16", 2), ("*fp32", 4)):
        for shape in SHAPES:
            n, c = shape[:2]
            hw = 1
            for d in shape[2:]:
                hw *= d
            for cl in (False, True):
                for backward in (False, True):
                    p = onepass_plan.onepass_plan(n, c, hw, 32, cl, size, SMS, L2, backward)
                    key = (dtype, backward, cl, p.k == 1, p.block_c, p.block_hw, p.num_warps, p.span_g, p.merge_s)
                    if key in seen:
                        continue
                    seen.add(key)
                    consts = dict(CPG=c // 32, SPAN_G=p.span_g, K=p.k, PHASE=0, WIDE=False, HAS_WEIGHT=True,
                                  HAS_BIAS=True, HAS_SCALE=False, HAS_SHIFT=False, ACTIVATION=1, ACC=tl.float32,
                                  BLOCK_C=p.block_c, BLOCK_HW=p.block_hw, BLOCK_G=p.block_g, MERGE_S=p.merge_s)
                    fn = onepass_backward_kernel if backward else onepass_forward_kernel
                    regs, spill = compile_regs(fn, dtype, consts, p.num_warps, "stride_c" if cl else "stride_hw")
                    print(f"| {dtype[1:]} | {'bwd' if backward else 'fwd'} | {'cl' if cl else 'nchw'} | "
                          f"{'x'.join(map(str, shape))} | {p.block_c}x{p.block_hw} | {p.num_warps} | {p.k} | "
                          f"{p.merge_s} | {regs} | {spill} | {per_sm(regs, p.num_warps)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
