#!/usr/bin/env bash
# Short prepared device check (~4.5 minutes) after a change to the Triton path: CUDA tests,
# the main job's correctness checks, host time per call, the float16 suite without the
# compile peer. run(command="bash benchmarks/gpu_check_session.sh", timeout_s=290)
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv; date -u
  pip install --no-deps --no-build-isolation -e . 2>&1 | tail -n 1; } > "$OUT/setup.txt" 2>&1
{ timeout 90 python -m pytest -q tests/test_triton_backend.py tests/test_toolchain.py -k "cuda or not cpu"
  echo "rc=$?"; } > "$OUT/tests_cuda.txt" 2>&1
timeout 55 python -m groupnorm --quick --no-bench > "$OUT/main_job.txt" 2>&1; echo "rc=$?" >> "$OUT/main_job.txt"
{ timeout 15 python benchmarks/profile_host.py --shape 1x320x64x64 --top 12
  timeout 12 python benchmarks/profile_host.py --shape 8x1280x8x8 --top 1; } > "$OUT/profile.txt" 2>&1
timeout 85 python benchmarks/benchmark_gpu.py --no-compile --out /tmp/suite > "$OUT/bench_suite_f16.txt" 2>&1
echo "rc=$?" >> "$OUT/bench_suite_f16.txt"
tail -n 3 "$OUT"/*.txt
