"""Supervised warm start: a few steps of cross-entropy on ``prompt -> \\boxed{answer}<eos>``.

Used by the embedded default so that RL starts from a policy that solves some problems (mixed
groups) and fails others (negative groups), the regime the paper studies.  The token
log-probs come from ``lens_kernels.token_logprobs`` on the same completion logits the RL loss
uses.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from .data import Problem
from .policy import Policy
from .rollout import generation_eos_ids, rollout_from_lists

log = logging.getLogger("lens_kernels.train")


def answer_tokens(policy: Policy, answer: str) -> list[int]:
    ids = policy.tokenizer("\\boxed{" + answer + "}", add_special_tokens=False).input_ids
    return ids + [policy.tokenizer.eos_token_id]


def supervised_warm_start(
    policy: Policy,
    problems: Sequence[Problem],
    prompt_ids: Sequence[Sequence[int]],
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    backend: str = "auto",
) -> list[float]:
    """``steps`` AdamW steps on random batches; returns the loss of every step."""
    import lens_kernels as lk

    targets = [answer_tokens(policy, p.answer) for p in problems]
    eos_ids = generation_eos_ids(policy.model, policy.tokenizer)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    policy.model.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(len(problems), (batch,), generator=generator).tolist()
        rows = rollout_from_lists(
            policy.tokenizer, [prompt_ids[i] for i in idx], 1, [targets[i] for i in idx],
            [[0.0] * len(targets[i]) for i in idx], eos_ids, policy.device,
        )
        logits = policy.completion_logits(rows, torch.arange(batch, device=policy.device))
        logp = lk.token_logprobs(logits, rows.completion_ids, backend=backend)
        mask = rows.completion_mask
        loss = -(logp * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, steps // 5) == 0:
            log.info("warm start %d/%d: loss %.3f", step + 1, steps, losses[-1])
    return losses
