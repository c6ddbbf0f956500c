#!/usr/bin/env bash
# Build the virtual environment in which tests/test_integration_verl.py runs (CI: .ci/run).
#
# verl 0.9.1 pins transformers<5.11 (the main environment has a newer one) and its full
# dependency tree pulls Ray's dashboard extras, wandb, tensorboard and more. The tests run
# verl's advantage code and its FSDP engine's fused forward (impl_backend=lens, tiny models
# from configs) on the CPU only, so verl and TransferQueue are installed with --no-deps, plus
# the packages that the imported modules (verl, verl.trainer.ppo.ray_trainer,
# verl.trainer.ppo.v1.utils, verl.utils.config, verl.workers.engine.fsdp.transformer_impl)
# need. torch stays at the local CPU wheel 2.13.0 and triton at 3.6.0, as in the main test
# command of README.md.
#
# usage: bash scripts/verl_test_env.sh [ENV_DIR]   (default .venv-verl)
set -euo pipefail
cd "$(dirname "$0")/.."
env_dir=${1:-.venv-verl}

python3 -m venv "$env_dir"
py="$env_dir/bin/python"
"$py" -m pip install -q --upgrade pip
constraints="$env_dir/constraints.txt"
printf 'torch==2.13.0\ntriton==3.6.0\n' > "$constraints"

"$py" -m pip install -q -c "$constraints" torch==2.13.0
"$py" -m pip install -q -c "$constraints" -e ".[test]" \
  "transformers>=5.5.3,<5.11,!=5.6.0" "tensordict>=0.8.0,<=0.10.0,!=0.9.0" ray omegaconf hydra-core \
  torchdata codetiming dill datasets pillow pyzmq msgspec peft cachetools uvicorn fastapi aiohttp
"$py" -m pip install -q --no-deps "verl==0.9.1" "TransferQueue==0.1.11"
