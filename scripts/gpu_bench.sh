#!/usr/bin/env bash
# The GPU benchmark of issue 8 in one command, for one GPU (an H100: about 6 minutes, 7 at most):
#
#   bash scripts/gpu_bench.sh OUT_DIR
#
# 1. builds the cuda backend (csrc/, into build/csrc) when it does not load yet and nvcc and
#    cmake are present (BUILD_CUDA=0 skips this);
# 2. lens-bench --preset target: bf16 V=151936 N=16384, lens and grpo, on- and off-policy;
#    fused-triton, fused-cuda, liger-grpo, liger-lens, the eager and compiled PyTorch reference;
# 3. lens-bench --preset sweep: bf16, V in {32000, 128256, 151936} x N in {4096, 16384, 32768},
#    both modes and both policies; the fused GPU backends against Liger;
# 4. prints the compact table of both runs (fwd+bwd ms / host ms, the two floors) and the
#    targets T1-T4, last.
#
# Every run checks each implementation against the float64 reference before timing it.  Runs
# stop starting measurements at their time limit (the rest are recorded as skipped) and rewrite
# their JSON after every measurement, so a cut-short run still leaves its results.
# OUT_DIR receives 7 files: gpu-bench.log (command, device, versions, every run's full output)
# and <device>-target.{json,md,png}, <device>-sweep.{json,md,png}.
# Environment: BUDGET_S (total seconds, default 400; the sweep gets what the target run leaves),
# TARGET_LIMIT_S (default 120), BUILD_CUDA (default 1), PYTHON.
set -uo pipefail

out="${1:?usage: bash scripts/gpu_bench.sh OUT_DIR}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$(command -v python || command -v python3)}"
deadline=$((SECONDS + ${BUDGET_S:-400}))
mkdir -p "$out"
out="$(cd "$out" && pwd)"
log="$out/gpu-bench.log"
cd "$root" || exit 1

say() { echo "[gpu_bench $(date -u +%H:%M:%S)] $*" | tee -a "$log"; }
left() { echo $((deadline - SECONDS)); }

{
    echo "command: bash scripts/gpu_bench.sh $*"
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); host: $(hostname)"
    echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) modified file(s)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
    "$python" - <<'EOF' 2>&1
import platform, torch
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {version('triton')}, liger-kernel {version('liger-kernel')}, lens-kernels {version('lens-kernels')}")
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
EOF
} >"$log"
cat "$log"

cuda_loads() {
    "$python" -c "import sys, torch, lens_kernels as lk; sys.exit(0 if lk.is_available('cuda', torch.device('cuda')) else 1)" \
        >>"$log" 2>&1
}
if [ "${BUILD_CUDA:-1}" = 1 ] && ! cuda_loads; then
    if command -v cmake >/dev/null && { command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; }; then
        say "building the cuda backend (csrc/ -> build/csrc) ..."
        arch="$("$python" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>>"$log")"
        if timeout 90 bash scripts/build_csrc.sh "-DCMAKE_CUDA_ARCHITECTURES=${arch:-90}" >>"$log" 2>&1; then
            export LENS_KERNELS_CUDA_LIBRARY="$root/build/csrc/liblens_kernels_cuda.so"
            cuda_loads && say "cuda backend built and loaded" || say "cuda backend built but does not load (see the log)"
        else
            say "cuda backend build failed (see the log); fused-cuda rows will say why they did not run"
        fi
    else
        say "cuda backend not loadable and no nvcc/cmake: fused-cuda rows will say why they did not run"
    fi
fi

bench() {  # bench PRESET LIMIT_S: one lens-bench run, its output in the log
    local preset="$1" limit="$2" start=$SECONDS
    say "lens-bench --preset $preset (time limit ${limit}s) ..."
    timeout $((limit + 30)) "$python" -m lens_kernels bench --preset "$preset" --out "$out" --time-limit "$limit" \
        >>"$log" 2>&1
    local rc=$?
    say "  $preset finished in $((SECONDS - start))s (exit $rc: 0 all checked rows ran, 1 a row failed its check" \
        "or raised, 124 killed at the limit)"
}
bench target "${TARGET_LIMIT_S:-120}"
sweep_limit=$(( $(left) - 50 ))
bench sweep $(( sweep_limit > 60 ? sweep_limit : 60 ))

jsons=()
for preset in target sweep; do
    found="$(ls -t "$out"/*-"$preset".json 2>/dev/null | head -1)"
    [ -n "$found" ] && jsons+=("$found")
done
echo | tee -a "$log"
if [ ${#jsons[@]} -eq 0 ]; then
    say "no results were written; see $log"
    exit 1
fi
"$python" -m lens_kernels bench --summarize "${jsons[@]}" 2>>"$log" | tee -a "$log"
say "files in $out: $(ls "$out" | tr '\n' ' ')"
