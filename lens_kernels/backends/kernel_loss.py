"""The loss on the GPU backends (triton, cuda): the launch sequence, written once.

Each backend provides the vocabulary and token kernels (``logprobs_forward``,
``logprobs_backward``, ``fused_loss``, ``token_loss``); the calibration before them and the
reduction after them are the shared kernels of ``backends.common``.

* **One pass** when every token's coefficient is known before the vocabulary pass: old
  log-probs given (LENS advantages depend only on them), ``mode="grpo"`` (advantages from the
  rewards alone), or caller-given advantages.  ``calibrate -> fused_loss -> finalize``: the
  gradient is written during the forward; the backward only scales it by ``grad_output``.
  (grpo on-policy adds a second ``calibrate`` after the pass, for the confidences.)
* **Two passes** otherwise (on-policy LENS: the confidences come from the pass's own
  log-probs): ``logprobs_forward -> calibrate -> token_loss -> finalize``, and the backward
  recomputes the softmax from the saved logsumexp (``logprobs_backward``).

Masked-out rows are never read by either path, and nothing syncs with the host.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..config import LensOptions
from ..groups import GroupLayout
from . import get
from .common import calibrate, finalize
from .common.calibrate import WEIGHT_ROW


class KernelLoss(NamedTuple):
    """Forward results (fp32).  ``calibration`` is (advantages, calibrated rewards,
    confidence, difficulty, negative_group_fraction), or None with caller-given advantages;
    ``lse``/``dlogp`` are set by the two-pass path only (its backward needs them)."""

    loss: torch.Tensor
    logp: torch.Tensor
    calibration: Optional[tuple]
    clip_fraction: torch.Tensor
    kl: Optional[torch.Tensor]
    lse: Optional[torch.Tensor] = None
    dlogp: Optional[torch.Tensor] = None


def one_pass_applies(options: LensOptions, has_old: bool, has_advantages: bool) -> bool:
    """Whether the per-token coefficient is known before the vocabulary pass."""
    return has_old or has_advantages or options.mode == "grpo"


def one_pass(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    live: torch.Tensor,
    rewards: torch.Tensor,
    old: Optional[torch.Tensor],
    ref: Optional[torch.Tensor],
    advantages: Optional[torch.Tensor],
    groups: Optional[GroupLayout],
    options: LensOptions,
    grad: Optional[torch.Tensor],
) -> KernelLoss:
    """The loss, with ``d loss / d logits`` written into ``grad`` (a new ``[B, T, V]`` buffer
    or the logits themselves; None: no gradient).  ``live [B, T]`` bool."""
    cal = calibrate(old, live, rewards, groups, options, advantages)
    logp, parts = get(options.backend).fused_loss(
        logits, target_ids, live, old, ref, cal.advantages, cal.scratch[WEIGHT_ROW], grad, options
    )
    if old is None and advantages is None:  # grpo on-policy: confidences from this pass
        calibrate(logp, live, rewards, groups, options, into=cal)
    loss, clip, kl = finalize(parts, cal.totals, ref is not None)
    return KernelLoss(loss, logp, cal.outputs, clip, kl)


def two_pass(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    live: torch.Tensor,
    rewards: torch.Tensor,
    ref: Optional[torch.Tensor],
    groups: GroupLayout,
    options: LensOptions,
) -> KernelLoss:
    """On-policy LENS: log-probs first, then the calibration they feed, then the surrogate."""
    backend = get(options.backend)
    logp, lse, _ = backend.logprobs_forward(logits, target_ids, options.inv_temperature, live)
    cal = calibrate(logp, live, rewards, groups, options)
    dlogp, parts = backend.token_loss(logp, None, live, ref, cal.advantages, cal.scratch[WEIGHT_ROW], options)
    loss, clip, kl = finalize(parts, cal.totals, ref is not None)
    return KernelLoss(loss, logp, cal.outputs, clip, kl, lse, dlogp)
