"""LENS for TRL (https://github.com/huggingface/trl): ``LensGRPOConfig`` and ``LensGRPOTrainer``.

``LensGRPOTrainer`` is TRL's ``GRPOTrainer`` with one change: after TRL has generated and
scored a batch, the per-sequence advantages are replaced by LENS advantages
(:func:`lens_kernels.lens_advantages_from_stats`), computed from

- the rewards TRL gathered across processes (the weighted sum of the reward functions, as in
  TRL's default ``multi_objective_aggregation="sum_then_normalize"``), and
- each completion's sum of old (sampling-policy) token log-probs and its token count, gathered
  across processes: ``2 * B`` numbers, never ``[B, T]``. TRL's ``old_per_token_logps`` is used
  when TRL computed it (``num_iterations > 1``, misaligned generation, vLLM importance
  sampling); otherwise one extra no-grad forward pass computes it.

The loss is :func:`lens_kernels.fused_linear_lens_loss` from the policy's last hidden states
and ``lm_head`` weight (``lens_fused_loss``, :mod:`.trl_loss`): TRL's clipped surrogate, KL,
aggregation (``loss_type`` grpo, bnpo, dr_grpo, dapo, luspo; ``"grpo"`` is LENS's
seq-mean-token-mean aggregation, and the default here) and metrics, without ``[B, T, V]``
logits. Where it cannot apply, TRL's own loss runs and the reason is logged once.

Everything else is TRL's: generation (transformers or vLLM), clipping options, logging. LENS
metrics are logged under ``lens/`` through TRL's metrics.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from accelerate.utils import is_peft_model
from packaging.version import Version

import trl
from trl import GRPOConfig, GRPOTrainer

from .. import lens_advantages_from_stats
from ..config import MODES
from . import trl_loss

logger = logging.getLogger(__name__)

#: TRL releases this module was tested with (``pip install "lens-kernels[trl]"``)
TESTED_TRL = (Version("1.16.0"), Version("1.17"))
#: TRL internals this trainer builds on
_REQUIRED = ("_generate_and_score_completions", "_calculate_rewards", "_get_per_token_logps_and_entropies",
             "_compute_loss")
_REQUIRED_MESSAGE = "lens_fused_loss=True, but lens_kernels' fused loss cannot compute TRL's loss here: "

_missing = [name for name in _REQUIRED if not hasattr(GRPOTrainer, name)]
if _missing:
    raise ImportError(
        f"lens_kernels.integrations.trl: trl {trl.__version__} has no GRPOTrainer.{_missing[0]}; "
        f"this integration is tested with trl>={TESTED_TRL[0]},<{TESTED_TRL[1]} (pip install 'lens-kernels[trl]')"
    )
if not TESTED_TRL[0] <= Version(trl.__version__) < TESTED_TRL[1]:
    warnings.warn(
        f"lens_kernels.integrations.trl is tested with trl>={TESTED_TRL[0]},<{TESTED_TRL[1]}, found trl "
        f"{trl.__version__}: GRPOTrainer internals it relies on may differ",
        RuntimeWarning,
        stacklevel=2,
    )


@dataclass
class LensGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the LENS options.

    ``lens_mode``: ``"lens"`` (default), ``"grpo"``, ``"lens-mixed-only"`` or
    ``"lens-negative-only"``; ``lens_alpha``: weight of all-wrong groups (default 0.25);
    ``lens_length_gamma``: the preference-aware variant's ``gamma`` in ``(0, 1)`` (off by
    default); ``lens_std_eps``: added to the group std. ``scale_rewards`` ("group" or "none")
    maps to LENS's ``scale_by_std``. ``loss_type`` defaults to ``"grpo"`` (seq-mean-token-mean,
    the paper's objective) instead of TRL's ``"dapo"``. ``lens_fused_loss``: None (default)
    computes the loss with :func:`lens_kernels.fused_linear_lens_loss` wherever it equals
    TRL's and falls back to TRL's loss elsewhere, logging why once; True requires it (a setting
    it cannot compute raises ``ValueError`` saying why); False keeps TRL's loss.
    """

    lens_mode: str = field(default="lens", metadata={"help": f"LENS advantage mode, one of {MODES}."})
    lens_alpha: float = field(default=0.25, metadata={"help": "Weight of all-wrong (negative) groups."})
    lens_length_gamma: Optional[float] = field(
        default=None, metadata={"help": "Preference-aware variant: gamma in (0, 1); None disables it."})
    lens_std_eps: float = field(default=1e-6, metadata={"help": "Added to the group std of the advantages."})
    loss_type: str = field(
        default="grpo", metadata={"help": "TRL loss type; 'grpo' is LENS's seq-mean-token-mean aggregation."})
    lens_fused_loss: Optional[bool] = field(
        default=None, metadata={"help": "Loss by lens_kernels.fused_linear_lens_loss: None = where it applies "
                                        "(else TRL's, reason logged once), True = required, False = TRL's loss."})

    def __post_init__(self):
        super().__post_init__()
        check_lens_args(self)


def check_lens_args(args: Any) -> dict:
    """Validate the LENS-relevant fields of a (Lens)GRPOConfig; return the LENS options."""
    mode = getattr(args, "lens_mode", "lens")
    if mode not in MODES:
        raise ValueError(f"lens_mode: expected one of {MODES}, got {mode!r}")
    alpha = float(getattr(args, "lens_alpha", 0.25))
    if not alpha >= 0:
        raise ValueError(f"lens_alpha: expected a number >= 0, got {alpha!r}")
    gamma = getattr(args, "lens_length_gamma", None)
    if gamma is not None and not 0 < float(gamma) < 1:
        raise ValueError(f"lens_length_gamma: expected None or a number in (0, 1), got {gamma!r}")
    std_eps = float(getattr(args, "lens_std_eps", 1e-6))
    if not std_eps >= 0:
        raise ValueError(f"lens_std_eps: expected a number >= 0, got {std_eps!r}")
    scale = args.scale_rewards
    if scale not in ("group", "none", True, False):
        raise ValueError(
            f"scale_rewards={scale!r}: LENS normalises within each group; use scale_rewards='group' (divide by "
            "the group std, the paper's setting) or 'none' (Dr.GRPO-style)")
    aggregation = getattr(args, "multi_objective_aggregation", "sum_then_normalize")
    if aggregation != "sum_then_normalize":
        raise ValueError(
            f"multi_objective_aggregation={aggregation!r}: LENS calibrates one reward in [0, 1] per completion; "
            "use 'sum_then_normalize' with reward_weights summing to at most 1")
    fused = getattr(args, "lens_fused_loss", None)
    if fused not in (None, True, False):
        raise ValueError(f"lens_fused_loss: expected None, True or False, got {fused!r}")
    reason = trl_loss.args_blocker(args) if fused else None
    if reason is not None:
        raise ValueError(f"{_REQUIRED_MESSAGE}{reason}")
    return dict(mode=mode, alpha=alpha, scale_by_std=scale in ("group", True), std_eps=std_eps,
                length_gamma=None if gamma is None else float(gamma))


class LensGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with LENS advantages (see the module docstring).

    Takes the same arguments as ``GRPOTrainer``; ``args`` should be a :class:`LensGRPOConfig`
    (a plain ``GRPOConfig`` gets the LENS defaults). Rewards must lie in ``[0, 1]``
    (1 = correct); a completion that every reward function scored ``None`` counts as 0 for the
    calibration and gets advantage 0, as in TRL.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lens_options = check_lens_args(self.args)
        self._lens_rewards_per_func: Optional[torch.Tensor] = None
        self._lens_fallbacks: set[str] = set()
        self.uses_fused_loss = self._lens_fused_loss_applies()

    def _lens_fused_loss_applies(self) -> bool:
        """Whether ``_compute_loss`` runs the fused loss; patches the policy's forward if so."""
        wanted = getattr(self.args, "lens_fused_loss", None)
        if wanted is False:
            logger.info("LensGRPOTrainer: TRL's loss (lens_fused_loss=False)")
            return False
        base = self.model.get_base_model() if is_peft_model(self.model) else self.model  # what TRL patched
        reason = trl_loss.args_blocker(self.args) or trl_loss.model_blocker(base, self.aux_loss_enabled)
        if reason is not None:
            self._lens_fall_back(reason, required=bool(wanted))
            return False
        trl_loss.add_lens_head(base)
        return True

    def _lens_fall_back(self, reason: str, required: bool) -> None:
        """Raise (``lens_fused_loss=True``) or log once why TRL's loss runs instead."""
        if required:
            raise ValueError(f"{_REQUIRED_MESSAGE}{reason}")
        if reason not in self._lens_fallbacks:
            self._lens_fallbacks.add(reason)
            logger.warning("LensGRPOTrainer: TRL's loss instead of lens_kernels' fused loss: %s", reason)

    def _compute_loss(self, model, inputs):
        if self.uses_fused_loss:
            reason = trl_loss.inputs_blocker(inputs)
            if reason is None:
                return trl_loss.fused_loss(self, model, inputs)
            self._lens_fall_back(reason, required=bool(getattr(self.args, "lens_fused_loss", None)))
        return super()._compute_loss(model, inputs)

    def _calculate_rewards(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        rewards_per_func = super()._calculate_rewards(*args, **kwargs)  # gathered across processes
        self._lens_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func, self._lens_rewards_per_func = self._lens_rewards_per_func, None
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        if rewards_per_func is None or group_size < 2:
            return output  # e.g. eval with one generation per prompt: no groups to calibrate
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        mask = mask.bool()
        old = output.get("old_per_token_logps")
        if old is None:
            old = self._lens_old_per_token_logps(output, mode)
        stats = torch.stack([torch.where(mask, old.double(), 0.0).sum(-1), mask.sum(-1).double()], dim=1)
        logp_sum, n_tokens = self.accelerator.gather(stats).unbind(dim=1)  # [B_global] each

        weights = self.reward_weights.to(rewards_per_func.device)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1).double()
        rewards[unscorable] = 0.0
        if rewards.numel() and (rewards.min() < 0 or rewards.max() > 1):
            raise ValueError(
                f"reward_funcs {self.reward_func_names} with reward_weights {weights.tolist()}: LENS needs each "
                f"completion's weighted reward in [0, 1] (1 = correct), got values in "
                f"[{rewards.min().item():g}, {rewards.max().item():g}]")
        result = lens_advantages_from_stats(
            logp_sum, n_tokens.round(), rewards.to(logp_sum.device), group_size=group_size, **self.lens_options)
        advantages = torch.where(unscorable.to(result.advantages.device), 0.0, result.advantages)

        local = len(output["completion_mask"])
        start = self.accelerator.process_index * local
        output["advantages"] = advantages[start:start + local].to(output["advantages"])
        self._lens_log(mode, result, advantages, rewards, group_size)
        return output

    def _lens_old_per_token_logps(self, output: dict, mode: str) -> torch.Tensor:
        """One no-grad pass of the current (= sampling) policy, as TRL's own old-logp pass."""
        from trl.models.utils import disable_gradient_checkpointing

        prompt_completion_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        forward_kwargs = {key: output[key] for key in trl_loss.MULTIMODAL_KEYS if key in output}
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model, prompt_completion_ids, attention_mask, output["completion_ids"].size(1),
                batch_size=batch_size, num_images=output.get("num_images"), num_tiles=output.get("num_tiles"),
                **forward_kwargs,
            )
        return logps

    def _lens_log(self, mode: str, result, advantages: torch.Tensor, rewards: torch.Tensor, group_size: int) -> None:
        """LENS metrics through TRL's metrics; the logged advantages become LENS's."""
        metrics = self._metrics[mode]
        negative = (rewards.view(-1, group_size) == 0).all(dim=1)  # TRL's groups: contiguous runs
        metrics["lens/negative_group_fraction"].append(negative.float().mean().item())
        metrics["lens/confidence_mean"].append(result.confidence.mean().item())
        metrics["lens/calibrated_reward_mean"].append(result.calibrated_rewards.mean().item())
        finite = result.difficulty[torch.isfinite(result.difficulty)]
        if finite.numel():
            metrics["lens/difficulty_mean"].append(finite.mean().item())
        rows = negative.repeat_interleave(group_size).to(advantages.device)
        if rows.any():
            metrics["lens/negative_group_abs_advantage_mean"].append(advantages[rows].abs().mean().item())
        logged = self._logs["advantages"]
        for _ in range(min(advantages.numel(), len(logged))):
            logged.pop()
        logged.extend(advantages.tolist())
