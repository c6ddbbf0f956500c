#!/usr/bin/env bash
# Build check of the CUDA backend: configure csrc/ with CMake into build/csrc and compile it;
# exits non-zero when nvcc/cmake are missing or anything fails to compile or link.
# Extra arguments go to the configure step (e.g. -DCMAKE_CUDA_ARCHITECTURES=90).
# Environment: MAX_JOBS (parallel jobs), TORCH_CUDA_ARCH_LIST / CUDAARCHS (architectures).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$root/build/csrc"

command -v cmake >/dev/null || { echo "build_csrc: cmake not found" >&2; exit 1; }
nvcc="${CUDACXX:-$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")}"
[ -x "$nvcc" ] || { echo "build_csrc: nvcc not found (set CUDACXX or CUDA_HOME, or put nvcc on PATH)" >&2; exit 1; }

start=$(date +%s)
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER="$nvcc" "$@"
cmake --build "$build" -j "${MAX_JOBS:-$(nproc)}"
library="$build/liblens_kernels_cuda.so"
[ -f "$library" ] || { echo "build_csrc: $library was not produced" >&2; exit 1; }
echo "build_csrc: built $library in $(( $(date +%s) - start ))s"
