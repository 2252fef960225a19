#!/usr/bin/env bash
# One prepared device check for a session that is lent a GPU (device tool, ~10 minutes):
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=560)
# Writes everything under $OUT (default ./gpu-out): test log, main-job output, benchmark
# tables. Stages are time-boxed so a slow stage cannot eat the rest of the lease.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u
  git rev-parse --short HEAD 2>/dev/null
} > "$OUT/env.txt" 2>&1
pip install --no-deps --no-build-isolation -e . > "$OUT/install.txt" 2>&1
# 1. The Triton kernels and toolchain tests on CUDA tensors (real kernels, CUDA graphs, opcheck).
timeout 200 python -m pytest -q -x tests/test_triton_backend.py tests/test_toolchain.py \
  > "$OUT/tests_cuda.txt" 2>&1; echo "rc=$?" >> "$OUT/tests_cuda.txt"
# 2. The main job: correctness through the public API on CUDA, then the quick benchmark.
timeout 120 python -m groupnorm --quick > "$OUT/main_job.txt" 2>&1; echo "rc=$?" >> "$OUT/main_job.txt"
# 3. The suite benchmark vs torch eager / torch.compile / copy bandwidth.
timeout 200 python benchmarks/benchmark_gpu.py --out "$OUT/gpu_suite" > "$OUT/bench_log.txt" 2>&1
echo "rc=$?" >> "$OUT/bench_log.txt"
tail -n 3 "$OUT"/*.txt
