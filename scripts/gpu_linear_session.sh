#!/usr/bin/env bash
# Device calls for the fused-linear path (issue 9); results under $OUT.
#   run(carry=[".whl"], command="bash scripts/gpu_linear_session.sh")
#       build csrc/, the GPU linear tests, then the lm_head + loss benchmark at the target shape
#       (on- and off-policy, with Liger and Cut Cross-Entropy from the wheels in .whl/, and the
#       no-grad log-prob pass; the Triton tiles autotuned on their first call, picks printed);
#       about 8 minutes.
#   run(carry=[".whl"], command="SWEEP=1 bash scripts/gpu_linear_session.sh")
#       the sweep over N, d and V alone (a second call: it does not fit beside the first).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
if [ "${SWEEP:-0}" = 1 ]; then
  timeout ${SWEEP_TIMEOUT:-540} python3 scripts/gpu_linear_bench.py --out $OUT/linear-sweep 2>&1 | tail -60
  exit
fi
bash scripts/build_csrc.sh -DCMAKE_CUDA_ARCHITECTURES=90 > $OUT/build.log 2>&1 || tail -20 $OUT/build.log
mkdir -p lens_kernels/backends/cuda/_lib && cp build/csrc/liblens_kernels_cuda.so lens_kernels/backends/cuda/_lib/
# The tests cover many small (V, d) shapes: one tile configuration each, no autotuning runs.
LENS_KERNELS_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider \
  tests/test_linear_logprobs.py tests/test_linear_loss.py tests/test_linear_one_pass.py tests/test_linear_tiles.py \
  2>&1 | tee $OUT/linear-tests.log | tail -6
TRITON_PRINT_AUTOTUNING=1 timeout ${BENCH_TIMEOUT:-360} python3 scripts/gpu_linear_bench.py --quick --out $OUT/linear \
  > $OUT/linear-bench.log 2>&1; grep -B3 "best config" $OUT/linear-bench.log | head -80; tail -40 $OUT/linear-bench.log
