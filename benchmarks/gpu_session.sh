#!/usr/bin/env bash
# One prepared device check for a session that is lent a GPU (device tool, ~9 minutes):
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=560)
# Writes six logs under $OUT (default ./gpu-out; the device tool returns at most 8 files).
# Stages are time-boxed so a slow stage cannot eat the rest of the lease; every benchmark
# prints its rows as it goes, so a stage cut off still leaves what it measured.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u
  git rev-parse --short HEAD 2>/dev/null
  pip install --no-deps --no-build-isolation -e . 2>&1 | tail -n 2
} > "$OUT/setup.txt" 2>&1
# 1. Triton kernels + toolchain on CUDA tensors (real kernels, CUDA graphs, opcheck, autocast),
#    then the >2^31-element test on the GPU.
{
  timeout 120 python -m pytest -q --maxfail=20 tests/test_triton_backend.py tests/test_toolchain.py
  echo "rc=$?"
  timeout 45 python -m pytest -q -m slow tests/test_large.py -k cuda
  echo "rc=$?"
} > "$OUT/tests_cuda.txt" 2>&1
# 2. The main job: correctness through the public API on CUDA, then the quick benchmark.
timeout 70 python -m groupnorm --quick > "$OUT/main_job.txt" 2>&1; echo "rc=$?" >> "$OUT/main_job.txt"
# 3. The suite benchmark, float16, vs torch eager / torch.compile / copy bandwidth.
timeout 160 python benchmarks/benchmark_gpu.py --out /tmp/gpu_suite_f16 > "$OUT/bench_suite_f16.txt" 2>&1
echo "rc=$?" >> "$OUT/bench_suite_f16.txt"
# 4. bfloat16 and float32 on a few shapes (no compile peer: its compiles take the time).
timeout 50 python benchmarks/benchmark_gpu.py --quick --no-compile --dtypes bfloat16,float32 \
  --out /tmp/gpu_quick > "$OUT/bench_bf16_f32.txt" 2>&1
echo "rc=$?" >> "$OUT/bench_bf16_f32.txt"
# 5. Fused epilogues on the GPU (ours one pass vs F.group_norm + separate ops).
timeout 45 python benchmarks/benchmark_fused.py --device cuda --no-compile --cases "b8 320x64x64" > "$OUT/fused.txt" 2>&1
echo "rc=$?" >> "$OUT/fused.txt"
tail -n 4 "$OUT"/*.txt
