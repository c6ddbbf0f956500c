"""The one set of benchmark plans, shared by the CLI and the pytest-benchmark suite.

A plan (preset) fixes the shapes (dtype, vocabulary, tokens), the loss modes, the
implementations and the timing budget, per device type.  Shapes follow issue 3: the
vocabularies of Qwen2.5 (151936), Llama-3.1 (128256) and Llama-2/Mistral (32000), N = B*T
from 1k to 32k tokens in groups of G=16, bf16 and fp32; CPU plans use smaller N.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .problems import DTYPES, MODEL_VOCABS, Shape, shape_for_tokens


def grid(dtypes, vocabs, tokens) -> tuple:
    """Every (dtype, vocab, tokens) combination, smallest N first within a vocabulary."""
    return tuple((d, v, n) for d in dtypes for v in vocabs for n in sorted(tokens))


@dataclass(frozen=True)
class Preset:
    cases: tuple  # (dtype name, vocab, tokens)
    modes: tuple = ("lens", "grpo")
    impls: tuple = ()  # empty: every registered implementation; "fused" = the auto backend
    group_size: int = 16
    rows: Optional[int] = None  # B; default two groups (more when T would exceed 4096)
    timer: dict = field(default_factory=dict)
    save: bool = True

    def shapes(self) -> list[Shape]:
        return [shape_for_tokens(n, v, DTYPES[d], self.group_size, self.rows) for d, v, n in self.cases]


GPU_TIMER = dict(warmup=3, min_runs=10, max_runs=100, budget_s=2.0)
CPU_TIMER = dict(warmup=1, min_runs=5, max_runs=20, budget_s=6.0)
H100_TARGET = ("bf16", MODEL_VOCABS["qwen2.5"], 16384)
CPU_TARGET = ("fp32", MODEL_VOCABS["llama-2/mistral"], 4096)
PRESETS = {
    "cuda": {
        # 8 prompts x 8 samples x 512 tokens.
        "quick": Preset((("bf16", 32000, 64 * 512),), ("lens",), ("fused", "reference-eager"), 8, 64,
                        dict(warmup=2, min_runs=5, max_runs=30, budget_s=0.5), save=False),
        "sweep": Preset(grid(("bf16", "fp32"), MODEL_VOCABS.values(), (1024, 2048, 4096, 8192, 16384, 32768)),
                        timer=GPU_TIMER),
        "target": Preset((H100_TARGET,), timer=GPU_TIMER),
        "suite": Preset((H100_TARGET, ("bf16", 128256, 4096), ("fp32", 32000, 4096)), timer=GPU_TIMER),
    },
    "cpu": {
        # 2 prompts x 4 samples x 128 tokens.
        "quick": Preset((("fp32", 32000, 8 * 128),), ("lens",), ("fused", "reference-eager"), 4, 8,
                        dict(warmup=1, min_runs=3, max_runs=10, budget_s=1.5), save=False),
        "sweep": Preset(grid(("fp32",), (32000,), (512, 1024, 2048, 4096)), ("lens",), timer=CPU_TIMER),
        "target": Preset((CPU_TARGET,), ("lens",), timer=CPU_TIMER),
        "suite": Preset(grid(("fp32",), (32000,), (512, 1024)), timer=dict(warmup=1, min_runs=3, max_runs=5)),
    },
}


def best_device() -> torch.device:
    """The device benchmarks run on by default: the current CUDA device, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def preset(name: str, device: torch.device) -> Preset:
    return PRESETS["cuda" if torch.device(device).type == "cuda" else "cpu"][name]
