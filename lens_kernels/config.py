"""Options of the loss after validation, in one immutable record shared by every backend."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

MODES = ("lens", "grpo", "lens-mixed-only", "lens-negative-only")
LOSS_AGG_MODES = (
    "seq-mean-token-mean",
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
# With ``length_gamma`` the negative-sample penalty (SPEC 1.10) is
# ``(1 / n) * pibar / max(gamma - pibar, LENGTH_GAMMA_MIN_GAP * gamma)``: a row at or above
# ``gamma`` is clamped (still finite, still increasing in pibar) rather than raising mid-run.
LENGTH_GAMMA_MIN_GAP = 1e-3


@dataclass(frozen=True)
class LossConfig:
    """The scalar options of SPEC section 1, already checked by ``lens_kernels.validation``."""

    mode: str = "lens"
    alpha: float = 0.25
    eps_low: float = 0.2
    eps_high: float = 0.2
    clip_ratio_c: Optional[float] = None
    beta: float = 0.0
    loss_agg_mode: str = "seq-mean-token-mean"
    scale_by_std: bool = True
    std_eps: float = 1e-6
    length_gamma: Optional[float] = None


class EpilogueResult(NamedTuple):
    """What every backend's ``epilogue_forward`` returns (all fp32 unless noted)."""

    loss: torch.Tensor  # [] the aggregated objective
    dlogp: torch.Tensor  # [B, T] d loss / d logp (0 at masked-out positions)
    advantages: torch.Tensor  # [B]
    calibrated_rewards: torch.Tensor  # [B]
    confidence: torch.Tensor  # [B] pibar
    difficulty: torch.Tensor  # [num_groups] D
    negative_group_fraction: torch.Tensor  # []
    clip_fraction: torch.Tensor  # [] over masked tokens
    kl: Optional[torch.Tensor]  # [] masked token mean of k3, None without ref_logprobs
