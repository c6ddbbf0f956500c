"""Synthetic RL batches for tests, benchmarks and the main command.

``make_problem`` builds the keyword arguments of ``fused_lens_loss`` for a batch that looks
like a real rollout: targets sampled from the policy itself (so confidences are not all
tiny), completions of varied length after a prompt, and groups of every type.
"""
from __future__ import annotations

from typing import Optional

import torch

from .reference import token_logprobs


def group_rewards(num_groups: int, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """Binary rewards ``[num_groups * group_size]`` cycling through group types: negative,
    mixed, all-positive, mixed, ... (at least one of each once there are three groups)."""
    rows = []
    for g in range(num_groups):
        kind = g % 4
        if kind == 0:
            r = torch.zeros(group_size)
        elif kind == 2:
            r = torch.ones(group_size)
        else:
            r = (torch.rand(group_size, generator=generator) < 0.4).float()
            r[0], r[-1] = 1.0, 0.0
        rows.append(r)
    return torch.cat(rows)


def make_problem(
    batch: int = 8,
    length: int = 16,
    vocab: int = 1000,
    group_size: int = 4,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    temperature: float = 1.0,
    logit_scale: float = 3.0,
    strided: bool = True,
    empty_rows: int = 0,
    off_policy: float = 0.0,
    with_ref: bool = False,
    rewards: Optional[torch.Tensor] = None,
) -> dict:
    """Keyword arguments for ``fused_lens_loss`` (``group_size`` grouping).

    ``strided`` makes ``logits`` the view ``full[:, :-1]`` of a ``[B, T + 1, V]`` tensor, as a
    trainer slicing model outputs would; ``empty_rows`` rows get no completion token;
    ``off_policy > 0`` adds that much noise to ``old_logprobs`` (clipping becomes active);
    ``with_ref`` adds ``ref_logprobs``.
    """
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(batch, length + 1, vocab, generator=gen) * logit_scale
    logits = full[:, :-1] if strided else full[:, :-1].contiguous()
    probs = torch.softmax(logits.reshape(-1, vocab).double() / temperature, -1)
    target_ids = torch.multinomial(probs, 1, generator=gen).view(batch, length)
    prompt = torch.randint(0, max(1, length // 3), (batch, 1), generator=gen)
    end = torch.randint(length // 2, length + 1, (batch, 1), generator=gen)
    positions = torch.arange(length).unsqueeze(0)
    mask = (positions >= prompt) & (positions < torch.maximum(end, prompt + 1))
    mask[:empty_rows] = False
    if rewards is None:
        rewards = group_rewards(batch // group_size, group_size, gen)
    logp = token_logprobs(logits, target_ids, temperature)
    kwargs = dict(
        logits=logits,
        target_ids=target_ids,
        completion_mask=mask,
        rewards=rewards.float(),
        group_size=group_size,
        temperature=temperature,
    )
    if off_policy:
        kwargs["old_logprobs"] = (logp + off_policy * torch.randn(logp.shape, generator=gen, dtype=logp.dtype)).clamp(max=0.0).float()
    if with_ref:
        kwargs["ref_logprobs"] = (logp + 0.3 * torch.randn(logp.shape, generator=gen, dtype=logp.dtype)).clamp(max=0.0).float()
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if key == "logits":
                value = full.to(device=device, dtype=dtype)[:, :-1] if strided else value.to(dtype)
        out[key] = value
    return out
