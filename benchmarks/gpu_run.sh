#!/usr/bin/env bash
# Prepared device checks for a run lent a GPU (the device tool; 15 minutes of
# device time in all, so each mode is time-boxed and every benchmark prints rows as it goes):
#   run(command="bash benchmarks/gpu_run.sh full",  timeout_s=560)  ~8 min: CUDA tests,
#       >2^31 test, main job, float16 suite with the torch.compile peer, bf16/f32 rows, fused rows
#   run(command="bash benchmarks/gpu_run.sh tune",  timeout_s=300)  ~4 min: host-time
#       profile, launch-plan variants (tune_gpu.py), CUDA tests
#   run(command="bash benchmarks/gpu_run.sh large", timeout_s=540)  ~8 min: one-pass kernels
#       for large groups (issue 26): tests, barrier vs pair, CUDA graph, large suite, >2^31, tuning, ncu
#   run(command="bash benchmarks/gpu_run.sh check", timeout_s=290)  ~3 min after a change:
#       CUDA tests, main job correctness, host profile, float16 suite without compile
#   run(command="bash benchmarks/gpu_run.sh everyday", timeout_s=540)  <= 8 min: the Triton
#       and toolchain CUDA tests, then benchmarks/gpu_check.py (eager rows for every suite shape,
#       dtype, layout and pass; then torch.compile default / reduce-overhead rows while time is left)
# Logs go under $OUT (default ./gpu-out; the device tool returns at most 8 files).
set -u
MODE=${1:-full}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u
  git rev-parse --short HEAD 2>/dev/null
  pip install --no-deps --no-build-isolation -e . 2>&1 | tail -n 1
} > "$OUT/setup.txt" 2>&1

cuda_tests() {  # $1: seconds; the CPU-only opcheck cases are left to CI. Eight xdist workers:
  # the Triton compiles are CPU-bound, and one worker ran 23 of 75 tests in 90 s (all 75 in 29 s with -n 8)
  { timeout "$1" python -m pytest -n 8 -q -p no:cacheprovider tests/test_toolchain.py tests/test_triton_backend.py \
      -k "cuda or not cpu"; echo "rc=$?"; } > "$OUT/tests_cuda.txt" 2>&1
}

host_profile() {
  { timeout 20 python benchmarks/profile_host.py --shape 1x320x64x64 --top 15
    timeout 15 python benchmarks/profile_host.py --shape 8x1280x8x8 --top 1; } > "$OUT/profile.txt" 2>&1
}

suite() {  # $1: seconds, then extra benchmark_gpu.py options
  local seconds=$1; shift
  timeout "$seconds" python benchmarks/benchmark_gpu.py --out /tmp/gpu_suite "$@" > "$OUT/bench_suite.txt" 2>&1
  echo "rc=$?" >> "$OUT/bench_suite.txt"
}

case "$MODE" in
  full)
    cuda_tests 120
    { timeout 45 python -m pytest -q -m slow tests/test_large.py -k cuda; echo "rc=$?"; } >> "$OUT/tests_cuda.txt" 2>&1
    timeout 70 python -m groupnorm --quick > "$OUT/main_job.txt" 2>&1; echo "rc=$?" >> "$OUT/main_job.txt"
    suite 160
    timeout 50 python benchmarks/benchmark_gpu.py --quick --no-compile --dtypes bfloat16,float32 \
      --out /tmp/gpu_quick > "$OUT/bench_bf16_f32.txt" 2>&1; echo "rc=$?" >> "$OUT/bench_bf16_f32.txt"
    timeout 45 python benchmarks/benchmark_fused.py --device cuda --no-compile --cases "b8 320x64x64" \
      > "$OUT/fused.txt" 2>&1; echo "rc=$?" >> "$OUT/fused.txt"
    ;;
  tune)
    host_profile
    timeout 95 python benchmarks/tune_gpu.py --budget-s 85 > "$OUT/tune.txt" 2>&1; echo "rc=$?" >> "$OUT/tune.txt"
    cuda_tests 125
    ;;
  check)
    cuda_tests 90
    timeout 55 python -m groupnorm --quick --no-bench > "$OUT/main_job.txt" 2>&1; echo "rc=$?" >> "$OUT/main_job.txt"
    host_profile
    suite 85 --no-compile
    ;;
  everyday)
    { timeout 120 python -m pytest -n 8 -q -p no:cacheprovider tests/test_triton_launch.py \
        tests/test_triton_backend.py tests/test_triton_compile.py; echo "rc=$?"
      timeout 35 python -m pytest -q -p no:cacheprovider tests/test_toolchain.py -k cuda; echo "rc=$?"
    } > "$OUT/tests_cuda.txt" 2>&1
    timeout 300 python benchmarks/gpu_check.py --out "$OUT/gpu_suite" --deadline-s 285 \
      > "$OUT/gpu_check.txt" 2>&1; echo "rc=$?" >> "$OUT/gpu_check.txt"
    ;;
  large)  # issue 26, one-pass kernels for large groups (~8 min); see benchmarks/gpu_large.py
    L="python benchmarks/gpu_large.py"
    { timeout 45 python -m pytest -n 8 -q -p no:cacheprovider tests/test_triton_large.py; echo "rc=$?"; } \
      > "$OUT/large_tests.txt" 2>&1
    { timeout 80 $L check; echo "rc=$?"; } > "$OUT/large_check.txt" 2>&1
    { timeout 140 $L bench --dtypes float16; echo "rc=$?"; } > "$OUT/large_bench.txt" 2>&1
    { timeout 90 python -m pytest -q -p no:cacheprovider -m slow tests/test_triton_large.py tests/test_large.py \
        -k "cuda or channels_last_past"; echo "rc=$?"; } > "$OUT/large_huge.txt" 2>&1
    { timeout 45 $L bench --dtypes bfloat16,float32 --compile-dtypes "" --cases 512x256x256,256x1024x1024,video; \
      echo "rc=$?"; } >> "$OUT/large_bench.txt" 2>&1
    { timeout 50 $L tune; echo "rc=$?"; } > "$OUT/large_tune.txt" 2>&1
    if command -v ncu > /dev/null; then
      { timeout 30 ncu --kernel-name regex:onepass_forward --launch-skip 1 --launch-count 1 --metrics \
          dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
          $L ncu-target; echo "rc=$?"; } > "$OUT/large_ncu.txt" 2>&1
    else
      echo "ncu not found" > "$OUT/large_ncu.txt"
    fi
    ;;
  *) echo "usage: bash benchmarks/gpu_run.sh [full|tune|check|everyday|large]" >&2; exit 2 ;;
esac
tail -n 3 "$OUT"/*.txt
