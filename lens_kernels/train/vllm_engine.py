"""Rollouts with vLLM (``--rollout vllm``; ``pip install 'lens-kernels[vllm]'``, a CUDA GPU).

Written against vLLM's documented offline API: ``LLM(...)``, ``LLM.generate`` with token-id
prompts and ``SamplingParams(n=G, logprobs=0)`` (the sampled token's log-prob at every step),
``LLM.apply_model`` to run a function on the engine's model (here ``load_weights`` with the
policy's state dict, the same names as the checkpoint vLLM loaded) and
``LLM.reset_prefix_cache``.  The engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the weights are handed over by reference, not
serialised.  ``logprobs_mode="processed_logprobs"`` makes the returned log-probs those of the
distribution actually sampled (after temperature and top-p), like the transformers path.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from .policy import Policy
from .rollout import Rollout, generation_eos_ids, rollout_from_lists


class VLLMEngine:
    def __init__(self, model_path: str, policy: Policy, config):
        try:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            import vllm
        except ImportError as exc:
            raise ImportError(
                "--rollout vllm needs vLLM: pip install 'lens-kernels[vllm]'"
            ) from exc
        self.policy = policy
        self.eos_ids = generation_eos_ids(policy.model, policy.tokenizer)
        self.llm = vllm.LLM(
            model=model_path,
            dtype="bfloat16",
            seed=config.seed,
            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
            enable_prefix_caching=False,
            logprobs_mode="processed_logprobs",
        )

    def generate(self, prompts: Sequence[Sequence[int]], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: Optional[int] = None) -> Rollout:
        from vllm import SamplingParams

        params = [  # one seed per prompt, so that prompts do not share a random stream
            SamplingParams(
                n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                logprobs=0, seed=None if seed is None else seed + i, stop_token_ids=self.eos_ids,
            )
            for i in range(len(prompts))
        ]
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        completions, logprobs = [], []
        for request in self.llm.generate(requests, params, use_tqdm=False):
            for sample in sorted(request.outputs, key=lambda o: o.index):
                tokens = list(sample.token_ids)
                completions.append(tokens)
                logprobs.append([step[tok].logprob for tok, step in zip(tokens, sample.logprobs)])
        return rollout_from_lists(self.policy.tokenizer, prompts, n, completions, logprobs,
                                  self.eos_ids, self.policy.device)

    def sync(self, model) -> None:
        """Copy the policy's current weights into the engine; the trainer calls this after each
        step's updates, before the next rollout."""
        weights = list(model.state_dict().items())
        self.llm.apply_model(lambda engine_model: engine_model.load_weights(weights))
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        del self.llm
