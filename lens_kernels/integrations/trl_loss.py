"""TRL's GRPO loss computed by :func:`lens_kernels.fused_linear_lens_loss` (``lens_fused_loss``).

``LensGRPOTrainer._compute_loss`` calls the policy with ``lens_loss=LensHeadLoss(...)``; the
forward patched by :func:`add_lens_head` runs the backbone only and hands its last hidden
states and the ``lm_head`` to that loss, so no ``[B, T, V]`` logits are ever made (TRL's own
``add_fused_lm_head`` patch, which this one wraps, does the same for its log-probs). The
call goes through the wrapped model (DDP, FSDP, DeepSpeed, PEFT), like TRL's.

The loss is TRL's clipped surrogate with the trainer's advantages ``[B]``, its old log-probs
(``old_per_token_logps``, or on-policy when TRL has none), ``beta * k3`` to
``ref_per_token_logps`` when TRL has a reference model, ``delta`` as the dual clip, and TRL's
aggregation: each ``loss_type`` maps to one ``loss_agg_mode`` times a factor that turns its
normaliser into TRL's (:data:`AGGREGATION`, :func:`loss_scale`). TRL's metrics (``entropy``,
``clip_ratio/*``, ``kl``) are computed as TRL computes them, the entropy by one extra no-grad
:func:`lens_kernels.fused_linear_token_logprobs` pass (one more ``[N, V]`` GEMM forward, about
a third of the loss's own lm_head work on the one-pass path; no backward).
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.distributed.tensor import DTensor

from trl.trainer.utils import maybe_gather_lm_head_ctx, nanmax, nanmin

from ..linear_api import fused_linear_lens_loss, fused_linear_token_logprobs

#: TRL ``loss_type`` -> the ``loss_agg_mode`` whose value :func:`loss_scale` turns into TRL's
AGGREGATION = {
    "grpo": "seq-mean-token-mean",        # mean over all B rows of the row's token mean
    "bnpo": "token-mean",                 # sum / local token count
    "dr_grpo": "seq-mean-token-sum-norm",  # sum / (B * max_completion_length)
    "dapo": "seq-mean-token-sum-norm",    # sum / (global token count / processes, per accumulation step)
    "luspo": "seq-mean-token-sum",        # mean over all B rows of the row's token sum
}
#: TRL loss types the fused loss does not compute, and why
REFUSED = {
    "cispo": "its token loss is -min(ratio, epsilon_high).detach() * A * logp, a detached weight on the log-prob, "
             "not the clipped surrogate",
    "sapo": "it replaces the clipped surrogate by a sigmoid gate of the ratio",
    "vespo": "it weights the log-prob by sequence-level gamma weights of the importance ratio",
}
#: keys of TRL's generation output that the model forward needs (multimodal inputs)
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                   "token_type_ids", "mm_token_type_ids", "image_position_ids")
_LOGIT_SCALES = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def args_blocker(args: Any) -> Optional[str]:
    """Why a (Lens)GRPOConfig's loss is not the fused loss's (None when it is)."""
    loss_type = args.loss_type
    if loss_type in REFUSED:
        return f"loss_type={loss_type!r}: {REFUSED[loss_type]}"
    if loss_type not in AGGREGATION:
        return f"loss_type={loss_type!r} is not one of {tuple(AGGREGATION)}"
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    reasons = (
        (args.importance_sampling_level != "token",
         f"importance_sampling_level={args.importance_sampling_level!r}: the fused loss clips per-token ratios"),
        (args.off_policy_mask_threshold is not None,
         "off_policy_mask_threshold: TRL drops sequences by their KL to the sampler, a row weight the fused loss "
         "does not take"),
        (args.top_entropy_quantile < 1.0,
         "top_entropy_quantile < 1: TRL keeps only the high-entropy tokens of this pass, a token mask the fused "
         "loss does not take"),
        (args.entropy_coef != 0.0 or args.use_adaptive_entropy,
         "entropy bonus (entropy_coef / use_adaptive_entropy): a differentiable entropy term the fused loss does "
         "not add"),
        (args.use_vllm and args.vllm_importance_sampling_correction,
         "vllm_importance_sampling_correction: TRL multiplies each token's loss by the vLLM importance ratio"),
        (args.beta != 0.0 and args.use_bias_correction_kl,
         "beta != 0 with use_bias_correction_kl=True: TRL multiplies the KL term by the ratio, the fused loss adds "
         "beta * k3 (set use_bias_correction_kl=False)"),
        (args.delta is not None and not args.delta > 1 + eps_high,
         f"delta={args.delta}: the fused loss's dual clip equals TRL's two-sided clip only for delta > 1 + "
         f"epsilon_high = {1 + eps_high}"),
    )
    return next((reason for blocked, reason in reasons if blocked), None)


def model_blocker(model: Any, aux_loss_enabled: bool) -> Optional[str]:
    """Why a model's loss cannot be the fused loss (None when it can)."""
    config = model.config
    text = config.get_text_config()
    if text is not config:
        return f"{type(model).__name__} is a vision-language model"
    scaled = [name for name in _LOGIT_SCALES if getattr(text, name, None) not in (None, 1, 1.0)]
    if scaled:
        return f"the model's config sets {scaled[0]}={getattr(text, scaled[0])}: logits the fused loss does not make"
    head = model.get_output_embeddings()
    if not isinstance(getattr(head, "weight", None), torch.Tensor) or hasattr(head, "base_layer"):
        return f"the lm_head ({type(head).__name__}) is not a plain linear layer (e.g. it carries a PEFT adapter)"
    if aux_loss_enabled:
        return "the MoE load-balancing loss (router_aux_loss_coef != 0) needs the router logits of this forward"
    return None


def inputs_blocker(inputs: dict) -> Optional[str]:
    """Why one batch cannot take the fused loss (None when it can)."""
    present = [key for key in MULTIMODAL_KEYS if inputs.get(key) is not None]
    if present:
        return f"the batch has {present[0]}: vision-language inputs"
    if inputs["advantages"].dim() != 1:
        return f"advantages of shape {tuple(inputs['advantages'].shape)}: the fused loss takes one per sequence [B]"
    return None


def add_lens_head(model: Any) -> None:
    """Let ``model(..., lens_loss=fn)`` return ``fn(last_hidden_state, lm_head)``, the backbone
    only (no logits); without ``lens_loss`` the forward is unchanged (TRL's, or the model's)."""
    if getattr(model, "_lens_head_added", False):
        return
    forward = model.forward

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def _forward(self, *args, lens_loss=None, **kwargs):
        if lens_loss is None:
            return forward(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        return lens_loss(hidden, self.get_output_embeddings())

    model.forward = types.MethodType(_forward, model)
    model._lens_head_added = True


@dataclass
class LensHeadLoss:
    """The fused loss of one batch, called by the patched forward with the hidden states.

    ``completion_ids`` / ``mask`` ``[B, T]`` (the last ``T`` positions of the sequence are
    the completion), ``advantages [B]``, ``old`` / ``ref`` ``[B, T]`` or None. Returns
    ``(LensOutput, entropy [B, T])``, the entropy without gradient."""

    completion_ids: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    old: Optional[torch.Tensor]
    ref: Optional[torch.Tensor]
    beta: float
    eps_low: float
    eps_high: float
    clip_ratio_c: Optional[float]
    temperature: float
    loss_agg_mode: str
    cast_lm_head_to_fp32: bool

    def __call__(self, hidden_states: torch.Tensor, lm_head: torch.nn.Module):
        width = self.completion_ids.size(1)
        weight, bias = lm_head.weight, lm_head.bias
        if isinstance(weight, DTensor):  # FSDP2: one full copy of the head for this loss, as TRL does
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        hidden = hidden_states[:, -width - 1:-1].to(weight.device)
        device = hidden.device.type
        dtype = self._compute_dtype(weight, device)
        with maybe_gather_lm_head_ctx(weight, bias), torch.autocast(device, enabled=False):
            hidden, weight, bias = (None if t is None else t.to(dtype) for t in (hidden, weight, bias))
            out = fused_linear_lens_loss(
                hidden, weight, self.completion_ids, self.mask, self.advantages.new_zeros(self.advantages.shape),
                bias=bias, advantages=self.advantages, old_logprobs=self.old, ref_logprobs=self.ref, beta=self.beta,
                eps_low=self.eps_low, eps_high=self.eps_high, clip_ratio_c=self.clip_ratio_c,
                temperature=self.temperature, loss_agg_mode=self.loss_agg_mode,
            )
            with torch.no_grad():
                _, entropy = fused_linear_token_logprobs(
                    hidden, weight, self.completion_ids, self.temperature, bias=bias, completion_mask=self.mask,
                    return_entropy=True,
                )
        return out, entropy

    def _compute_dtype(self, weight: torch.Tensor, device: str) -> torch.dtype:
        """The dtype TRL's head computes in: fp32 with ``cast_lm_head_to_fp32``, else autocast's
        dtype under autocast, else the weight's."""
        if self.cast_lm_head_to_fp32:
            return torch.float32
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return weight.dtype


def loss_scale(trainer: Any, inputs: dict, mask: torch.Tensor, mode: str):
    """The factor from ``AGGREGATION[loss_type]``'s value to TRL's loss (gradient accumulation
    included): a float, or a 0-dim tensor (no host sync)."""
    loss_type = trainer.loss_type
    rows, width = mask.shape
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    if loss_type in ("grpo", "luspo"):  # lens_kernels averages over rows with tokens, TRL over all rows
        return (mask.sum(-1) > 0).sum().clamp(min=1) / (rows * accumulation)
    if loss_type == "bnpo":
        return 1.0 / accumulation
    if loss_type == "dr_grpo":
        return width / (trainer.max_completion_length * accumulation)
    normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes  # dapo
    if mode == "train":
        normalizer = normalizer * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
    return rows * width / normalizer


def fused_loss(trainer: Any, model: Any, inputs: dict) -> torch.Tensor:
    """TRL's ``_compute_loss`` by the fused loss: the same value, gradients and metrics."""
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    mode = "train" if trainer.model.training else "eval"
    args = trainer.args
    head = LensHeadLoss(
        completion_ids=completion_ids, mask=mask, advantages=inputs["advantages"].float(),
        old=inputs.get("old_per_token_logps"),
        ref=inputs["ref_per_token_logps"] if trainer.beta != 0.0 else None, beta=trainer.beta,
        eps_low=trainer.epsilon_low, eps_high=trainer.epsilon_high, clip_ratio_c=args.delta,
        temperature=trainer.temperature, loss_agg_mode=AGGREGATION[trainer.loss_type],
        cast_lm_head_to_fp32=args.cast_lm_head_to_fp32,
    )
    with trainer.accelerator.autocast():
        out, entropy = model(input_ids=input_ids, attention_mask=attention_mask, lens_loss=head)
    log_metrics(trainer, mode, out.logprobs, head.old, head.ref, entropy, mask, head.advantages)
    return out.loss * loss_scale(trainer, inputs, mask, mode)


def log_metrics(trainer: Any, mode: str, logp, old, ref, entropy, mask, advantages) -> None:
    """TRL's ``entropy``, ``kl`` and ``clip_ratio/*`` metrics, with TRL's formulas and reductions."""
    metrics = trainer._metrics[mode]
    mask = mask.to(logp.dtype)
    advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logp - (logp if old is None else old))  # on-policy: old = logp, ratio 1

    def global_masked_mean(x):
        totals = trainer.accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def gathered_seq_means(x):
        return trainer.accelerator.gather((x * mask).sum(-1) / mask.sum(-1))

    if trainer.beta != 0.0:
        metrics["kl"].append(global_masked_mean(torch.exp(ref - logp) - (ref - logp) - 1))
    metrics["entropy"].append(global_masked_mean(entropy))
    low = ((ratio < 1 - trainer.epsilon_low) & (advantages < 0)).float()
    high = ((ratio > 1 + trainer.epsilon_high) & (advantages > 0)).float()
    metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
    metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
    metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
    metrics["clip_ratio/low_min"].append(nanmin(gathered_seq_means(low)).item())
    metrics["clip_ratio/high_max"].append(nanmax(gathered_seq_means(high)).item())
