"""SPEC steps 3-7 for trainers that compute the surrogate themselves: ``lens_advantages``
from ``[B, T]`` sampler log-probs, and ``lens_advantages_from_stats`` from per-row sums (what a
distributed trainer gathers across ranks: O(B) numbers instead of ``[B, T]``)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import reference
from .config import LensOptions
from .validation import (
    ValueChecks, _float_tensor, advantage_options, check_devices, check_groups, check_logprob_values, check_mask,
    check_rewards,
)


class LensAdvantages(NamedTuple):
    """Steps 3-7 of SPEC section 1 (all detached, fp32)."""

    advantages: torch.Tensor  # [B]
    calibrated_rewards: torch.Tensor  # [B]
    confidence: torch.Tensor  # [B]
    difficulty: torch.Tensor  # [num_groups]
    negative_group_fraction: torch.Tensor  # []


def lens_advantages_from_stats(
    logp_sum: torch.Tensor,
    n_tokens: torch.Tensor,
    rewards: torch.Tensor,
    group_size: Optional[int] = None,
    group_index: Optional[torch.Tensor] = None,
    mode: str = "lens",
    alpha: float = 0.25,
    scale_by_std: bool = True,
    std_eps: float = 1e-6,
    length_gamma: Optional[float] = None,
) -> LensAdvantages:
    """Confidence, difficulty, calibrated rewards and advantages from per-row statistics.

    ``logp_sum [B]``: the sum of each row's old (sampler) log-probs over its completion
    tokens; ``n_tokens [B]``: its number of completion tokens (0 allowed: ``pibar = 0``);
    ``rewards [B]`` in ``[0, 1]``; groups as in :func:`lens_kernels.fused_lens_loss`.
    Runs the reference formulas in float64 on the inputs' device and returns fp32.  An empty
    batch (``B = 0``) gives empty outputs and ``negative_group_fraction = 0`` (never NaN).
    """
    if not isinstance(logp_sum, torch.Tensor) or logp_sum.dim() != 1:
        raise ValueError(f"logp_sum: expected a [B] floating-point tensor, got {_describe(logp_sum)}")
    (batch,), device = logp_sum.shape, logp_sum.device
    whose = "logp_sum's"
    check_devices(whose, logp_sum=logp_sum, n_tokens=n_tokens, rewards=rewards, group_index=group_index)
    _float_tensor("logp_sum", logp_sum, (batch,), device, whose)
    if not isinstance(n_tokens, torch.Tensor):
        raise TypeError(f"n_tokens: expected a [B] tensor of token counts, got {type(n_tokens).__name__}")
    if n_tokens.shape != (batch,) or n_tokens.device != device:
        raise ValueError(f"n_tokens: expected shape [{batch}] on {device} ({whose} shape and device), "
                         f"got {list(n_tokens.shape)} on {n_tokens.device}")
    checks = ValueChecks()
    checks.add((n_tokens < 0).any() | (n_tokens != n_tokens.round()).any(),
               "n_tokens: expected whole numbers >= 0 (completion tokens per row)")
    checks.finite("logp_sum", logp_sum, None)
    check_rewards(rewards, batch, device, checks, whose)
    groups = check_groups(group_size, group_index, batch, device, checks)
    options = LensOptions(**advantage_options(mode, alpha, scale_by_std, std_eps, length_gamma))
    checks.settle()
    cal = reference.calibrate_from_stats(logp_sum.double(), n_tokens.double(), rewards.double(), groups, options)
    return _result(cal)


def lens_advantages(
    old_logprobs: torch.Tensor,
    completion_mask: torch.Tensor,
    rewards: torch.Tensor,
    group_size: Optional[int] = None,
    group_index: Optional[torch.Tensor] = None,
    mode: str = "lens",
    alpha: float = 0.25,
    scale_by_std: bool = True,
    std_eps: float = 1e-6,
    length_gamma: Optional[float] = None,
) -> LensAdvantages:
    """Confidence, difficulty, calibrated rewards and advantages from sampler log-probs.

    ``old_logprobs [B, T]`` (the policy that sampled), ``completion_mask [B, T]``,
    ``rewards [B]`` in ``[0, 1]``; groups as in :func:`lens_kernels.fused_lens_loss`.  A thin
    wrapper over :func:`lens_advantages_from_stats` (``B = 0``: empty outputs, fraction 0).
    """
    if not isinstance(old_logprobs, torch.Tensor) or old_logprobs.dim() != 2:
        raise ValueError(f"old_logprobs: expected a [B, T] floating-point tensor, got {_describe(old_logprobs)}")
    device = old_logprobs.device
    whose = "old_logprobs'"
    check_devices(whose, old_logprobs=old_logprobs, completion_mask=completion_mask, rewards=rewards,
                  group_index=group_index)
    _float_tensor("old_logprobs", old_logprobs, tuple(old_logprobs.shape), device, whose)
    checks = ValueChecks()
    check_mask(completion_mask, tuple(old_logprobs.shape), device, checks, whose)
    check_logprob_values("old_logprobs", old_logprobs, completion_mask, checks)
    checks.settle()
    logp_sum, n_tokens = reference.sequence_stats(old_logprobs.double(), completion_mask)
    return lens_advantages_from_stats(
        logp_sum, n_tokens, rewards, group_size, group_index, mode, alpha, scale_by_std, std_eps, length_gamma
    )


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {list(value.shape)}"
    return type(value).__name__


def _result(cal: reference.Calibration) -> LensAdvantages:
    return LensAdvantages(
        cal.advantages.float(), cal.calibrated_rewards.float(), cal.confidence.float(),
        cal.difficulty.float(), cal.negative.float().sum() / max(cal.negative.numel(), 1),
    )
