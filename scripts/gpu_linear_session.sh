#!/usr/bin/env bash
# One device call for the fused-linear path (issue 9): build csrc/, the GPU linear tests, then the lm_head +
# loss benchmark at the target shape (on- and off-policy, with Liger and Cut Cross-Entropy from
# the wheels carried in .whl/), then the sweep if SWEEP=1.  Results under $OUT.
#   run(carry=[".whl"], command="bash scripts/gpu_linear_session.sh")
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
bash scripts/build_csrc.sh -DCMAKE_CUDA_ARCHITECTURES=90 > $OUT/build.log 2>&1 || tail -20 $OUT/build.log
mkdir -p lens_kernels/backends/cuda/_lib && cp build/csrc/liblens_kernels_cuda.so lens_kernels/backends/cuda/_lib/
timeout ${TEST_TIMEOUT:-180} python3 -m pytest -q -p no:cacheprovider tests/test_linear_logprobs.py \
  tests/test_linear_loss.py tests/test_linear_one_pass.py 2>&1 | tee $OUT/linear-tests.log | tail -6
timeout ${BENCH_TIMEOUT:-300} python3 scripts/gpu_linear_bench.py --quick --out $OUT/linear 2>&1 | tail -30
if [ "${SWEEP:-0}" = 1 ]; then
  timeout ${SWEEP_TIMEOUT:-420} python3 scripts/gpu_linear_bench.py --out $OUT/linear-sweep 2>&1 | tail -50
fi
