"""Rollout engines: ``generate(prompts, n, ...) -> Rollout`` and ``sync(model)`` after updates.

``hf`` samples with the policy itself (CPU or GPU; nothing to sync).  ``vllm`` keeps a separate
vLLM engine on the GPU and receives the policy's weights after every optimizer step
(``lens_kernels.train.vllm_engine``, needs the ``[vllm]`` extra).
"""
from __future__ import annotations

from typing import Optional, Sequence

from .policy import Policy
from .rollout import Rollout, hf_generate


class HFEngine:
    def __init__(self, policy: Policy, batch_prompts: int = 0):
        self.policy, self.batch_prompts = policy, batch_prompts

    def generate(self, prompts: Sequence[Sequence[int]], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: Optional[int] = None) -> Rollout:
        """``seed`` is unused: transformers samples from the global torch RNG, which the trainer
        seeds, checkpoints and forks for evaluation."""
        p = self.policy
        return hf_generate(p.model, p.tokenizer, prompts, n, temperature, top_p, max_new_tokens,
                           self.batch_prompts, p.autocast_dtype)

    def sync(self, model) -> None:
        pass

    def close(self) -> None:
        pass


def make_engine(kind: str, policy: Policy, model_path: str, config):
    if kind == "hf":
        return HFEngine(policy, config.generation_batch_prompts)
    if kind == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(model_path, policy, config)
    raise ValueError(f"rollout: expected 'hf' or 'vllm', got {kind!r}")
