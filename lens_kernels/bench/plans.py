"""The one set of benchmark plans, shared by the CLI and the pytest-benchmark suite.

A plan (preset) fixes the shapes (dtype, vocabulary, tokens), the policies (on: old
log-probs = the current ones; off: given, noisy), the loss modes, the implementations and the
timing budget, per device type.  The GPU sweep is issue 8's: the vocabularies of Qwen2.5
(151936), Llama-3.1 (128256) and Llama-2/Mistral (32000) x N = B*T in {4k, 16k, 32k} tokens in
groups of G=16, bf16, both modes and both policies, the fused GPU backends against Liger; the
target plan adds the PyTorch references at the target shape.  Their timing budgets are sized
so that ``scripts/gpu_bench.sh`` runs both in under 7 minutes on an H100.  CPU plans use
smaller N.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .problems import DTYPES, MODEL_VOCABS, POLICIES, Shape, shape_for_tokens


def grid(dtypes, vocabs, tokens) -> tuple:
    """Every (dtype, vocab, tokens) combination, smallest N first within a vocabulary."""
    return tuple((d, v, n) for d in dtypes for v in vocabs for n in sorted(tokens))


@dataclass(frozen=True)
class Preset:
    cases: tuple  # (dtype name, vocab, tokens)
    modes: tuple = ("lens", "grpo")
    policies: tuple = POLICIES
    impls: tuple = ()  # empty: every registered implementation; "fused" = the auto backend
    group_size: int = 16
    rows: Optional[int] = None  # B; default two groups (more when T would exceed 4096)
    timer: dict = field(default_factory=dict)
    save: bool = True

    def shapes(self) -> list[Shape]:
        return [shape_for_tokens(n, v, DTYPES[d], self.group_size, self.rows) for d, v, n in self.cases]


GPU_TIMER = dict(warmup=3, min_runs=10, max_runs=100, budget_s=2.0)
# 108 runs (9 shapes x 2 policies x 2 modes x 3 implementations) in about 3-4 minutes.
GPU_SWEEP_TIMER = dict(warmup=3, min_runs=10, max_runs=40, budget_s=0.3)
GPU_TARGET_TIMER = dict(warmup=3, min_runs=10, max_runs=100, budget_s=0.8)
CPU_TIMER = dict(warmup=1, min_runs=5, max_runs=20, budget_s=6.0)
H100_TARGET = ("bf16", MODEL_VOCABS["qwen2.5"], 16384)
SMALL_TARGET = ("bf16", MODEL_VOCABS["llama-2/mistral"], 4096)  # issue 8, T3
CPU_TARGET = ("fp32", MODEL_VOCABS["llama-2/mistral"], 4096)
GPU_SWEEP_TOKENS = (4096, 16384, 32768)
GPU_VS_LIGER = ("fused-triton", "fused-cuda", "liger-grpo", "liger-lens")
PRESETS = {
    "cuda": {
        # 8 prompts x 8 samples x 512 tokens.
        "quick": Preset((("bf16", 32000, 64 * 512),), ("lens",), ("on",), ("fused", "reference-eager"), 8, 64,
                        dict(warmup=2, min_runs=5, max_runs=30, budget_s=0.5), save=False),
        "sweep": Preset(grid(("bf16",), MODEL_VOCABS.values(), GPU_SWEEP_TOKENS), impls=GPU_VS_LIGER,
                        timer=GPU_SWEEP_TIMER),
        "target": Preset((H100_TARGET,), impls=GPU_VS_LIGER + ("reference-eager", "reference-compiled"),
                         timer=GPU_TARGET_TIMER),
        "suite": Preset((H100_TARGET, ("bf16", 128256, 4096), ("fp32", 32000, 4096)), timer=GPU_TIMER),
    },
    "cpu": {
        # 2 prompts x 4 samples x 128 tokens.
        "quick": Preset((("fp32", 32000, 8 * 128),), ("lens",), ("on",), ("fused", "reference-eager"), 4, 8,
                        dict(warmup=1, min_runs=3, max_runs=10, budget_s=1.5), save=False),
        "sweep": Preset(grid(("fp32",), (32000,), (512, 1024, 2048, 4096)), ("lens",), timer=CPU_TIMER),
        "target": Preset((CPU_TARGET,), ("lens",), timer=CPU_TIMER),
        # Seconds, not minutes (2 prompts x 4 samples x 16 tokens): inductor's C++ compile of the
        # compiled reference (20-50 s per case here) is left to lens-bench.
        "suite": Preset(grid(("fp32",), (32000,), (128,)), impls=("fused-torch", "reference-eager"), group_size=4,
                        rows=8, timer=dict(warmup=1, min_runs=3, max_runs=5)),
    },
}


def best_device() -> torch.device:
    """The device benchmarks run on by default: the current CUDA device, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def preset(name: str, device: torch.device) -> Preset:
    return PRESETS["cuda" if torch.device(device).type == "cuda" else "cpu"][name]
