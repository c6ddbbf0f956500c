#!/usr/bin/env bash
# One device call: build csrc, GPU tests, host-time profile, the issue-8 benchmark; results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
bash scripts/build_csrc.sh -DCMAKE_CUDA_ARCHITECTURES=90 > $OUT/build.log 2>&1 || tail -20 $OUT/build.log
mkdir -p lens_kernels/backends/cuda/_lib && cp build/csrc/liblens_kernels_cuda.so lens_kernels/backends/cuda/_lib/
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q --maxfail=15 -p no:cacheprovider ${TESTS:-tests/test_gpu_light_call.py} 2>&1 | tee $OUT/tests.log | tail -8
timeout 120 python3 scripts/gpu_host_profile.py > $OUT/host_profile.txt 2>&1; head -60 $OUT/host_profile.txt
[ -n "${BENCH:-1}" ] && BUDGET_S=${BUDGET_S:-330} PYTHON=python3 BUILD_CUDA=0 bash scripts/gpu_bench.sh $OUT/bench 2>&1 | tail -60
