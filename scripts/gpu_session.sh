#!/usr/bin/env bash
# One device call: build csrc, GPU tests, quick benchmark; results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/device.txt
bash scripts/build_csrc.sh -DCMAKE_CUDA_ARCHITECTURES=90 > $OUT/build.log 2>&1 || tail -20 $OUT/build.log
mkdir -p lens_kernels/backends/cuda/_lib && cp build/csrc/liblens_kernels_cuda.so lens_kernels/backends/cuda/_lib/
python3 -c "import lens_kernels as lk, torch; print('cuda available:', lk.is_available('cuda', torch.device('cuda')))"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q --maxfail=15 -p no:cacheprovider ${TESTS:-tests/test_gpu_light_call.py tests/test_kernel_paths.py tests/test_parity.py} 2>&1 | tee $OUT/tests.log | tail -25
timeout ${BENCH_TIMEOUT:-200} python3 scripts/gpu_quick_bench.py $OUT/quick_bench.json 2>&1 | tee $OUT/bench.log | tail -45
