"""Rollouts with transformers ``generate``: G samples per prompt plus the sampler's log-probs.

Rows come out grouped: prompt ``i`` owns rows ``i*G .. i*G+G-1`` (what ``group_size=G``
expects).  ``Rollout.sequences`` is ``[left-padded prompt | completion]``; the completion of a
row runs up to and including its first end-of-sequence token (``completion_mask``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Rollout:
    sequences: torch.Tensor  # [B, P + C] int64
    attention_mask: torch.Tensor  # [B, P + C] int64 (0 on prompt padding)
    prompt_len: int  # P
    completion_mask: torch.Tensor  # [B, C] bool
    sampler_logprobs: torch.Tensor  # [B, C] fp32, the sampler's log-probs (0 where masked)
    texts: list[str]  # decoded completions

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len :]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def completion_mask(completions: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """True up to and including the first end-of-sequence token of each row."""
    is_eos = torch.isin(completions, torch.tensor(list(eos_ids), device=completions.device))
    before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    return before == 0


class _SamplerLogprobs:
    """A logits processor placed after our own temperature and top-p warpers (generate itself
    gets neither, so the order is ours): at each step it receives exactly the distribution that
    is sampled from, and the previous step's token (the last input id)."""

    def __init__(self):
        self.prev = None  # log-softmax of the previous step's processed scores
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.collect(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def collect(self, tokens: torch.Tensor) -> None:
        self.steps.append(self.prev.gather(1, tokens[:, None]).squeeze(1))
        self.prev = None


def generation_eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    return sorted(set(eos if isinstance(eos, (list, tuple)) else [eos]))


@torch.no_grad()
def hf_generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_prompts: int = 0,
    autocast_dtype=None,
) -> Rollout:
    """``n`` samples for each tokenized prompt (plain sampling: no top-k, no penalties)."""
    from transformers import (
        GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper,
    )

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = generation_eos_ids(model, tokenizer)
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    step = batch_prompts or len(prompts)
    chunks, logps = [], []
    was_training, saved_config = model.training, model.generation_config
    model.eval()
    # A clean generation config: the model's own (top-k, penalties, ...) must not leak in.
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
        num_return_sequences=n, pad_token_id=pad_id, eos_token_id=eos_ids,
    )
    try:
        for start in range(0, len(prompts), step):
            recorder = _SamplerLogprobs()
            warpers = [TemperatureLogitsWarper(temperature)] + (
                [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
            )
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model.generate(
                    input_ids=prompt_ids[start : start + step],
                    attention_mask=prompt_mask[start : start + step],
                    logits_processor=LogitsProcessorList(warpers + [recorder]),
                )
            completion = out[:, prompt_ids.shape[1] :]
            recorder.collect(completion[:, -1])
            chunks.append(completion)
            logps.append(torch.stack(recorder.steps, dim=1))
    finally:
        model.train(was_training)
        model.generation_config = saved_config
    width = max(c.shape[1] for c in chunks)
    completions = torch.cat([_right_pad(c, width, pad_id) for c in chunks])
    sampler = torch.cat([_right_pad(lp, width, 0.0) for lp in logps])
    mask = completion_mask(completions, eos_ids)
    rows = prompt_ids.repeat_interleave(n, dim=0)
    row_mask = prompt_mask.repeat_interleave(n, dim=0)
    return Rollout(
        sequences=torch.cat([rows, completions], dim=1),
        attention_mask=torch.cat([row_mask, torch.ones_like(completions)], dim=1),
        prompt_len=prompt_ids.shape[1],
        completion_mask=mask,
        sampler_logprobs=torch.where(mask, sampler, torch.zeros_like(sampler)),
        texts=decode_completions(tokenizer, completions, mask),
    )


def _right_pad(t: torch.Tensor, width: int, value) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    pad = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)


def decode_completions(tokenizer, completions: torch.Tensor, mask: torch.Tensor) -> list[str]:
    ids = completions.tolist()
    lengths = mask.sum(1).tolist()
    return [tokenizer.decode(row[:length], skip_special_tokens=True) for row, length in zip(ids, lengths)]


def rollout_from_lists(
    tokenizer,
    prompts: Sequence[Sequence[int]],
    n: int,
    completions: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[float]],
    eos_ids: Sequence[int],
    device,
) -> Rollout:
    """A ``Rollout`` from per-row token and log-prob lists (``n`` consecutive rows per prompt),
    as an external sampler such as vLLM returns them."""
    if len(completions) != len(prompts) * n or len(logprobs) != len(completions):
        raise ValueError(
            f"expected {len(prompts) * n} completions and log-prob rows, got "
            f"{len(completions)} and {len(logprobs)}"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    width = max(1, max(len(c) for c in completions))
    ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    logp = torch.zeros((len(completions), width), dtype=torch.float32)
    valid = torch.zeros((len(completions), width), dtype=torch.bool)
    for i, (row, lp) in enumerate(zip(completions, logprobs)):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        logp[i, : len(lp)] = torch.tensor(list(lp), dtype=torch.float32)
        valid[i, : len(row)] = True
    ids, logp, valid = ids.to(device), logp.to(device), valid.to(device)
    mask = completion_mask(ids, eos_ids) & valid
    return Rollout(
        sequences=torch.cat([prompt_ids.repeat_interleave(n, dim=0), ids], dim=1),
        attention_mask=torch.cat([prompt_mask.repeat_interleave(n, dim=0), valid.long()], dim=1),
        prompt_len=prompt_ids.shape[1],
        completion_mask=mask,
        sampler_logprobs=torch.where(mask, logp, torch.zeros_like(logp)),
        texts=decode_completions(tokenizer, ids, mask),
    )
