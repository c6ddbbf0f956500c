"""The policy: a transformers causal LM from a local folder, its tokenizer, and the forward pass
that yields completion logits in the layout ``fused_lens_loss`` expects.

Weights stay fp32; on a GPU the forward runs under bf16 autocast and, while training, with
gradient checkpointing.  ``completion_logits`` returns ``logits[b, t]`` predicting completion
token ``t`` (the shift is done here), only for the completion positions (``logits_to_keep``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .rollout import Rollout


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    autocast_dtype: Optional[torch.dtype]

    @classmethod
    def load(cls, path: str, device: str = "auto", bf16: bool = True,
             gradient_checkpointing: bool = True) -> "Policy":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return cls.wrap(model, tokenizer, device, bf16, gradient_checkpointing)

    @classmethod
    def wrap(cls, model, tokenizer, device: str = "auto", bf16: bool = True,
             gradient_checkpointing: bool = True) -> "Policy":
        dev = resolve_device(device)
        model = model.to(dev)
        on_gpu = dev.type == "cuda"
        if on_gpu and gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # training forward; generate turns its cache on itself
        return cls(model, tokenizer, dev, torch.bfloat16 if (on_gpu and bf16) else None)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def encode_prompts(self, texts: Sequence[str], use_chat_template: bool) -> list[list[int]]:
        tok = self.tokenizer
        if use_chat_template:
            texts = [
                tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                        add_generation_prompt=True)
                for t in texts
            ]
            return [tok(t, add_special_tokens=False).input_ids for t in texts]
        return [tok(t).input_ids for t in texts]

    def completion_logits(self, rollout: Rollout, rows: torch.Tensor) -> torch.Tensor:
        """``[len(rows), C, V]`` logits; position ids follow the left padding, as in generate."""
        seq = rollout.sequences[rows]
        mask = rollout.attention_mask[rows]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        width = rollout.completion_mask.shape[1]
        with self.autocast():
            out = self.model(input_ids=seq, attention_mask=mask, position_ids=positions,
                             logits_to_keep=width + 1, use_cache=False)
        return out.logits[:, :-1]

    @torch.no_grad()
    def logprobs(self, rollout: Rollout, temperature: float, batch_rows: int = 0,
                 backend: str = "auto") -> torch.Tensor:
        """Per-token log-probs of the completions under the current weights, ``[B, C]`` fp32."""
        import lens_kernels as lk

        was_training = self.model.training
        self.model.eval()
        total = rollout.sequences.shape[0]
        step = batch_rows or total
        parts = []
        for start in range(0, total, step):
            rows = torch.arange(start, min(start + step, total), device=self.device)
            logits = self.completion_logits(rollout, rows)
            parts.append(lk.token_logprobs(logits, rollout.completion_ids[rows], temperature,
                                            backend=backend))
        self.model.train(was_training)
        out = torch.cat(parts)
        return torch.where(rollout.completion_mask, out, torch.zeros_like(out))
