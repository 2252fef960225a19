#!/usr/bin/env bash
# Second prepared device check (~4.5 minutes): where the host time goes, launch-plan variants,
# and the CUDA tests. run(command="bash benchmarks/gpu_tune_session.sh", timeout_s=300)
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv; date -u
  pip install --no-deps --no-build-isolation -e . 2>&1 | tail -n 1; } > "$OUT/setup.txt" 2>&1
{ timeout 20 python benchmarks/profile_host.py --shape 1x320x64x64
  timeout 15 python benchmarks/profile_host.py --shape 8x1280x8x8 --top 10; } > "$OUT/profile.txt" 2>&1
timeout 95 python benchmarks/tune_gpu.py --budget-s 85 > "$OUT/tune.txt" 2>&1; echo "rc=$?" >> "$OUT/tune.txt"
{ timeout 125 python -m pytest -q -p no:randomly --durations=8 tests/test_toolchain.py tests/test_triton_backend.py
  echo "rc=$?"; } > "$OUT/tests_cuda.txt" 2>&1
tail -n 3 "$OUT"/*.txt
