"""The record returned by ``fused_lens_loss`` (every backend and the reference)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import EpilogueResult


@dataclass
class LensOutput:
    """Loss and diagnostics of one call (``B`` rows, ``T`` positions).

    ``loss`` is a 0-dim tensor whose ``backward()`` gives d loss / d logits; everything else is
    detached.  ``logprobs [B, T]`` (fp32) can be fed back as ``old_logprobs`` in the next PPO
    epoch; positions a backend skips (masked-out rows, on the GPU backends) hold 0.
    ``calibrated_rewards [B]`` holds the reward each row's advantage was computed from:
    ``rt`` of SPEC 1.6 where the mode calibrates that row's group type, the raw reward
    otherwise (so it equals ``rewards`` in ``mode="grpo"``).  ``clip_fraction`` and ``kl`` are
    means over masked tokens; ``kl`` (k3) is None without ``ref_logprobs``.  With caller-given
    ``advantages`` (which replace SPEC steps 3-7), ``advantages`` is that tensor and
    ``calibrated_rewards``, ``confidence``, ``difficulty`` and ``negative_group_fraction``
    are None.
    """

    loss: torch.Tensor
    logprobs: torch.Tensor
    advantages: torch.Tensor
    calibrated_rewards: Optional[torch.Tensor]
    confidence: Optional[torch.Tensor]
    difficulty: Optional[torch.Tensor]
    negative_group_fraction: Optional[torch.Tensor]
    clip_fraction: torch.Tensor
    kl: Optional[torch.Tensor]

    @classmethod
    def from_epilogue(cls, result: EpilogueResult, logprobs: torch.Tensor) -> "LensOutput":
        detach = lambda t: None if t is None else t.detach()  # noqa: E731
        return cls(
            loss=result.loss,
            logprobs=logprobs.detach(),
            advantages=detach(result.advantages),
            calibrated_rewards=detach(result.calibrated_rewards),
            confidence=detach(result.confidence),
            difficulty=detach(result.difficulty),
            negative_group_fraction=detach(result.negative_group_fraction),
            clip_fraction=detach(result.clip_fraction),
            kl=detach(result.kl),
        )
