"""The policy: a transformers causal LM from a local folder, its tokenizer, and the forward pass
that yields completion logits in the layout ``fused_lens_loss`` expects.

Weights stay fp32; on a GPU the forward runs under bf16 autocast and, while training, with
gradient checkpointing.  ``completion_logits`` returns ``logits[b, t]`` predicting completion
token ``t`` (the shift is done here), only for the completion positions (``logits_to_keep``).
Where the output head is a plain ``nn.Linear`` (separate or tied), ``completion_hidden`` gives
the base model's hidden states at the same positions and the head's parameters instead, for
``fused_linear_lens_loss``, which never builds the logits (``fused_head_reason`` is None then).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .rollout import Rollout

def fused_head_reason(model) -> Optional[str]:
    """None when the logits are ``base_model(...) @ head.weight.T + head.bias`` with a plain
    ``nn.Linear`` head, else why the fused-linear loss cannot stand in for them."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return f"the output head is {type(head).__name__}, not a plain torch.nn.Linear"
    if getattr(model, "base_model", model) is model:
        return "the model has no separate base model to take hidden states from"
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(model.config, name, None) not in (None, 1, 1.0):
            return f"config.{name} changes the logits after the head"
    return None


def linear_backend(backend: str) -> str:
    """The fused-linear backend for the loss backend ``backend`` (it has no ``cuda`` one)."""
    return backend if backend in ("auto", "triton", "torch") else "auto"


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
    fused_head_reason: Optional[str] = None  # None: the loss runs from hidden states

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
        reason = fused_head_reason(model)
        return cls(model, tokenizer, dev, torch.bfloat16 if (on_gpu and bf16) else None, reason)

    @property
    def loss_path(self) -> str:
        """What the loss and the old log-probs are computed from, said once in the trainer's log."""
        if self.fused_head_reason is not None:
            return f"logits then fused_lens_loss ({self.fused_head_reason})"
        tied = self.model.get_output_embeddings().weight is self.model.get_input_embeddings().weight
        return f"fused-linear (hidden states and the {'tied' if tied else 'separate'} lm_head weight; no logits)"

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

    def completion_hidden(self, rollout: Rollout, rows: torch.Tensor):
        """``(hidden [len(rows), C, d], weight [V, d], bias [V] or None)``: the base model's last
        hidden states at the positions ``completion_logits`` reads, and the head's parameters,
        in the autocast dtype (the dtype autocast would run the head in)."""
        seq = rollout.sequences[rows]
        mask = rollout.attention_mask[rows]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        width = rollout.completion_mask.shape[1]
        with self.autocast():
            out = self.model.base_model(input_ids=seq, attention_mask=mask, position_ids=positions, use_cache=False)
        head = self.model.get_output_embeddings()
        dtype = self.autocast_dtype or head.weight.dtype
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return cast(out.last_hidden_state[:, -(width + 1):-1]), cast(head.weight), cast(head.bias)

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
            if self.fused_head_reason is None:
                hidden, weight, bias = self.completion_hidden(rollout, rows)
                parts.append(lk.fused_linear_token_logprobs(hidden, weight, rollout.completion_ids[rows], temperature,
                                                            bias=bias, backend=linear_backend(backend),
                                                            completion_mask=rollout.completion_mask[rows]))
                continue
            logits = self.completion_logits(rollout, rows)
            parts.append(lk.token_logprobs(logits, rollout.completion_ids[rows], temperature,
                                            backend=backend))
        self.model.train(was_training)
        out = torch.cat(parts)
        return torch.where(rollout.completion_mask, out, torch.zeros_like(out))
