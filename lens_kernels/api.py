"""The public functions: ``fused_lens_loss``, ``token_logprobs`` and ``lens_advantages``."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import ops, reference
from .output import LensOutput
from .validation import (
    _eager, _float_tensor, check_backend, check_groups, check_inplace, check_logits, check_mask,
    check_options, check_rewards, check_targets, check_temperature, validate, ValueChecks,
)


def _check_finite(logp: torch.Tensor, mask: torch.Tensor) -> None:
    bad = ~torch.isfinite(logp) & mask.bool()
    if bool(bad.any()):
        b, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"logits: non-finite values make the log-prob non-finite at {int(bad.sum())} masked "
            f"position(s), first at [b={b}, t={t}]; pass check_finite=False to get a non-finite loss instead"
        )


def fused_lens_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    rewards: torch.Tensor,
    group_size: Optional[int] = None,
    group_index: Optional[torch.Tensor] = None,
    old_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    mode: str = "lens",
    alpha: float = 0.25,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_ratio_c: Optional[float] = None,
    temperature: float = 1.0,
    loss_agg_mode: str = "seq-mean-token-mean",
    scale_by_std: bool = True,
    std_eps: float = 1e-6,
    length_gamma: Optional[float] = None,
    backend: str = "auto",
    inplace_backward: bool = False,
    check_finite: bool = True,
) -> LensOutput:
    """The LENS (or GRPO) clipped-surrogate loss straight from logits.

    Shapes: ``logits [B, T, V]`` (fp32/bf16/fp16, any strides, e.g. ``model_logits[:, :-1]``),
    ``target_ids [B, T]`` int64 where ``logits[b, t]`` predicts ``target_ids[b, t]``,
    ``completion_mask [B, T]`` (bool or 0/1), ``rewards [B]`` in ``[0, 1]``; groups are the
    contiguous runs of ``group_size`` rows or the labels ``group_index [B]`` (exactly one);
    ``old_logprobs`` / ``ref_logprobs [B, T]`` optional (on-policy when ``old_logprobs`` is
    None).  The math is SPEC section 1 (``lens_kernels.reference``).

    ``backend``: ``"auto"`` (Triton on CUDA, torch otherwise), ``"triton"``, ``"torch"`` or
    ``"cuda"``.  No ``[B, T, V]`` fp32 buffer is ever made; the backward writes one gradient
    of the logits' shape and dtype, or none with ``inplace_backward=True`` (the gradient then
    overwrites the logits' storage: use it only when nothing else reads the logits after the
    loss; it saves the buffer when the logits are an intermediate, e.g. ``lm_head`` output,
    while a leaf tensor's ``.grad`` is a copy made by autograd).  ``check_finite`` raises ``ValueError`` when non-finite logits reach a masked
    position (one host sync; skipped under ``torch.compile``).

    Returns a :class:`LensOutput`: ``loss`` (0-dim, differentiable), ``logprobs [B, T]``,
    ``advantages``, ``calibrated_rewards`` and ``confidence`` ``[B]``, ``difficulty
    [num_groups]``, and the 0-dim metrics ``negative_group_fraction``, ``clip_fraction``,
    ``kl`` (None without ``ref_logprobs``).
    """
    checked = validate(
        logits, target_ids, completion_mask, rewards, group_size, group_index, old_logprobs,
        ref_logprobs, beta, mode, alpha, eps_low, eps_high, clip_ratio_c, temperature,
        loss_agg_mode, scale_by_std, std_eps, length_gamma, backend,
    )
    check_inplace(inplace_backward, logits)
    logp = ops.token_logprobs(logits, target_ids, temperature, checked.backend, inplace_backward)
    work = logp.dtype  # fp32 (float64 for float64 logits on the torch backend)
    mask = completion_mask.to(work).contiguous()
    if check_finite and _eager():
        _check_finite(logp, mask)
    old = logp.detach() if old_logprobs is None else old_logprobs.to(work).contiguous()
    ref = None if ref_logprobs is None else ref_logprobs.to(work).contiguous()
    result = ops.epilogue(
        logp, old, mask, rewards.to(work).contiguous(), checked.groups, ref, checked.cfg, checked.backend
    )
    return LensOutput.from_epilogue(result, logp)


def token_logprobs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    temperature: float = 1.0,
    backend: str = "auto",
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Per-token log-probs ``log softmax(logits / temperature)[target]``.

    ``logits [B, T, V]`` (any strides), ``target_ids [B, T]`` int64 -> ``[B, T]`` fp32
    (float64 for float64 logits, torch backend), differentiable in ``logits``; no
    ``[B, T, V]`` fp32 buffer is made.
    """
    check_logits(logits)
    checks = ValueChecks()
    check_targets(target_ids, logits, checks)
    check_temperature(temperature)
    backend = check_backend(backend, logits)
    check_inplace(inplace_backward, logits)
    checks.settle()
    return ops.token_logprobs(logits, target_ids, temperature, backend, inplace_backward)


class LensAdvantages(NamedTuple):
    """Steps 3-7 of SPEC section 1 (all detached, fp32)."""

    advantages: torch.Tensor  # [B]
    calibrated_rewards: torch.Tensor  # [B]
    confidence: torch.Tensor  # [B]
    difficulty: torch.Tensor  # [num_groups]
    negative_group_fraction: torch.Tensor  # []


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
    ``rewards [B]`` in ``[0, 1]``; groups as in :func:`fused_lens_loss`.  For trainers that
    compute the surrogate themselves; runs the reference formulas in float64 on the inputs'
    device and returns fp32.
    """
    if not isinstance(old_logprobs, torch.Tensor):
        raise TypeError(f"old_logprobs: expected a [B, T] floating-point tensor, got {type(old_logprobs).__name__}")
    if old_logprobs.dim() != 2:
        raise ValueError(f"old_logprobs: expected shape [B, T], got {list(old_logprobs.shape)}")
    batch, _ = old_logprobs.shape
    device = old_logprobs.device
    _float_tensor("old_logprobs", old_logprobs, tuple(old_logprobs.shape), device)
    checks = ValueChecks()
    check_mask(completion_mask, tuple(old_logprobs.shape), device, checks)
    check_rewards(rewards, batch, device, checks)
    groups = check_groups(group_size, group_index, batch, device, checks)
    cfg = check_options(mode, alpha, scale_by_std, std_eps, length_gamma)
    checks.settle()
    cal = reference.calibrate(old_logprobs.double(), completion_mask, rewards.double(), groups, cfg)
    return LensAdvantages(
        cal.advantages.float(), cal.calibrated_rewards.float(), cal.confidence.float(),
        cal.difficulty.float(), cal.negative.float().mean(),
    )
