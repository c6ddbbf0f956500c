"""PPO epochs over minibatches of whole groups, each loss from ``lens_kernels.fused_lens_loss``.

Minibatches hold whole groups (``minibatch_prompts`` prompts, every one of their G rows), so the
group statistics inside the loss (confidence, difficulty, advantages) are those of the full
groups, computed from the fixed ``old_logprobs`` in every epoch.  A minibatch may be split into
micro-batches for memory; each micro-loss is weighted by its share of the aggregation's
denominator, so the accumulated gradient equals the gradient of the whole minibatch's loss.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import TrainConfig
from .mechanism import negative_group_grad_share
from .policy import Policy, linear_backend
from .rollout import Rollout


def _share(mask: torch.Tensor, rows: torch.Tensor, all_rows: torch.Tensor, agg: str) -> float:
    """Fraction of ``all_rows``' aggregation denominator that ``rows`` holds."""
    if agg == "token-mean":
        return float(mask[rows].sum() / mask[all_rows].sum())
    if agg == "seq-mean-token-sum-norm":
        return len(rows) / len(all_rows)
    return float(mask[rows].any(1).sum() / mask[all_rows].any(1).sum())


def _weighted(out, share: float) -> torch.Tensor:
    """A micro-batch's loss weighted by its share of the minibatch's loss."""
    return out.loss * share


def loss_kwargs(config: TrainConfig, mode: str) -> dict:
    """The options of ``fused_lens_loss`` that come from the config."""
    return dict(
        group_size=config.group_size, mode=mode, alpha=config.alpha, eps_low=config.clip_low,
        eps_high=config.clip_high, clip_ratio_c=config.clip_ratio_c, beta=config.kl_beta,
        temperature=config.temperature, loss_agg_mode=config.loss_agg_mode,
        scale_by_std=config.scale_by_std, length_gamma=config.length_gamma,
        backend=config.loss_backend,
    )


def ppo_update(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    rewards: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor],
    config: TrainConfig,
    mode: str,
    measure_grad_share: bool = False,
) -> dict[str, float]:
    """``ppo_epochs`` passes; returns means over the optimizer updates and per-row statistics.

    With ``measure_grad_share`` the first update also reports the share of its gradient that
    comes from negative groups (``lens_kernels.train.mechanism``; one extra forward/backward
    over those groups' rows, no effect on the update).
    """
    import lens_kernels as lk

    G = config.group_size
    num_groups = rewards.shape[0] // G
    per_update = config.minibatch_prompts or num_groups
    micro = max(G, (config.micro_batch_rows or per_update * G) // G * G)
    kwargs = loss_kwargs(config, mode)
    targets, mask = rollout.completion_ids, rollout.completion_mask
    params = [p for p in policy.model.parameters() if p.requires_grad]
    sums = {"loss": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0, "kl": 0.0}
    updates = 0
    advantages = torch.zeros_like(rewards, dtype=torch.float32)
    confidence = torch.zeros_like(advantages)
    calibrated = torch.zeros_like(advantages)
    negative = (rewards.view(num_groups, G).amax(1) == 0).repeat_interleave(G)
    mechanism: dict[str, float] = {}

    def forward(rows: torch.Tensor, rows_all: torch.Tensor):
        """The loss of ``rows`` and their share of the minibatch ``rows_all``'s loss."""
        old, ref = old_logprobs[rows], None if ref_logprobs is None else ref_logprobs[rows]
        if policy.fused_head_reason is None:  # hidden states and the lm_head weight, no logits
            hidden, weight, bias = policy.completion_hidden(rollout, rows)
            out = lk.fused_linear_lens_loss(
                hidden, weight, targets[rows], mask[rows], rewards[rows], bias=bias, old_logprobs=old,
                ref_logprobs=ref, **{**kwargs, "backend": linear_backend(kwargs["backend"])},
            )
        else:
            logits = policy.completion_logits(rollout, rows)
            out = lk.fused_lens_loss(
                logits, targets[rows], mask[rows], rewards[rows], old_logprobs=old, ref_logprobs=ref, **kwargs,
            )
        return out, _share(mask, rows, rows_all, config.loss_agg_mode)

    policy.model.train()
    for epoch in range(config.ppo_epochs):
        order = torch.randperm(num_groups) if per_update < num_groups else torch.arange(num_groups)
        for start in range(0, num_groups, per_update):
            groups = order[start : start + per_update].to(policy.device)
            rows_all = (groups[:, None] * G + torch.arange(G, device=policy.device)).flatten()
            optimizer.zero_grad(set_to_none=True)
            for m in range(0, len(rows_all), micro):
                rows = rows_all[m : m + micro]
                out, share = forward(rows, rows_all)
                (out.loss * share).backward()
                sums["loss"] += float(out.loss.detach()) * share
                sums["clip_fraction"] += float(out.clip_fraction) * share
                sums["kl"] += 0.0 if out.kl is None else float(out.kl) * share
                if epoch == 0:
                    advantages[rows] = out.advantages.float()
                    confidence[rows] = out.confidence.float()
                    calibrated[rows] = out.calibrated_rewards.float()
            if measure_grad_share and updates == 0:
                mechanism = negative_group_grad_share(
                    params, rows_all[negative[rows_all]], micro,
                    lambda rows, rows_all=rows_all: _weighted(*forward(rows, rows_all)),
                )
            sums["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
            optimizer.step()
            updates += 1
    optimizer.zero_grad(set_to_none=True)
    stats = {k: v / updates for k, v in sums.items()}
    if ref_logprobs is None:
        del stats["kl"]
    stats["updates"] = updates
    stats.update(mechanism)
    wrong = rewards < 0.5
    stats["confidence_mean"] = float(confidence.mean())
    stats["confidence_wrong_mean"] = float(confidence[wrong].mean()) if wrong.any() else 0.0
    stats["confidence_correct_mean"] = float(confidence[~wrong].mean()) if (~wrong).any() else 0.0
    stats["calibrated_reward_wrong_mean"] = float(calibrated[wrong].mean()) if wrong.any() else 0.0
    stats["advantage_abs_negative_groups"] = (
        float(advantages[negative].abs().mean()) if negative.any() else 0.0
    )
    return stats
