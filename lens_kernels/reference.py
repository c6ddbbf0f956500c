"""SPEC section 1 in plain PyTorch: the executable specification.

Written for clarity, not speed: it materialises ``log_softmax`` over the vocabulary and, by
default, computes in float64.  Every backend is tested against these functions, and the torch
backend runs the epilogue functions (steps 3-9) directly.  Each function is differentiable in
``logp`` where the SPEC says gradients flow; confidences, difficulties and advantages are
computed from detached values.

Masked-out positions never enter a sum: they are selected away with ``torch.where``, so even
non-finite values there cannot leak into any output or gradient.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .config import LENGTH_GAMMA_MIN_GAP, EpilogueResult, LensOptions
from .groups import GroupLayout

__all__ = [
    "token_logprobs",
    "token_entropy",
    "sequence_confidence",
    "group_difficulty",
    "calibrated_rewards",
    "advantages",
    "token_objective",
    "aggregate",
    "sequence_stats",
    "calibrate_from_stats",
    "calibrate",
    "epilogue",
    "fused_lens_loss",
]


def token_logprobs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    temperature: float = 1.0,
    compute_dtype: torch.dtype = torch.float64,
    return_entropy: bool = False,
):
    """Step 1: ``log softmax(logits / tau)[target]``.  ``[B, T, V] -> [B, T]``, or packed
    ``[N, V] -> [N]``.  An id outside ``[0, V)`` gives NaN, as on every backend (the -100 label
    at masked-out positions is selected away by every later step; at a masked position, with
    ``check_values=False``, it makes the loss NaN); its gradient has no one-hot term.  Written
    ``z[target] - logsumexp(z)`` (not ``log_softmax``, which is NaN over a whole row holding
    +inf): a +inf logit elsewhere in the row gives -inf, as the fused backends do.

    ``return_entropy=True`` returns ``(logp, entropy)``, ``entropy = -sum_v p_v log p_v`` of
    ``p = softmax(logits / tau)`` per position (:func:`token_entropy`)."""
    z = logits.to(compute_dtype) / temperature
    vocab = logits.shape[-1]
    picked = z.gather(-1, target_ids.clamp(0, vocab - 1).unsqueeze(-1)).squeeze(-1)
    lse = z.logsumexp(-1)
    logp = torch.where((target_ids < 0) | (target_ids >= vocab), float("nan"), picked) - lse
    if not return_entropy:
        return logp
    return logp, token_entropy(z, lse)


def token_entropy(z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``-sum_v p_v log p_v`` over the last axis, ``p = exp(z - lse)``: ``[..., V] -> [...]``.
    Entries with ``p_v = 0`` (``-inf`` logits, underflow) add exactly 0, to the value and to
    the gradient (``0 * log 0`` is never formed), so ``d H / d z_v = -p_v (log p_v + H)``."""
    log_p = z - lse.unsqueeze(-1)
    p = log_p.exp()
    return -(p * torch.where(p > 0, log_p, 0)).sum(-1)


def sequence_stats(old: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp_sum [B], n [B])``: the sum of the masked ``old`` log-probs of each row and its
    number of completion tokens (masked-out positions are selected away, whatever they hold)."""
    mask = mask.bool()
    return torch.where(mask, old, 0).sum(-1), mask.sum(-1).to(old.dtype)


def confidence_from_stats(logp_sum: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Step 3 from per-row sums: ``pibar = exp(logp_sum / n)``, 0 for rows with ``n = 0``."""
    return torch.where(n > 0, torch.exp(logp_sum / n.clamp(min=1)), 0)


def sequence_confidence(old: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: ``(pibar [B], n [B])``, the geometric-mean probability under pi_old and the
    number of completion tokens; ``pibar = 0`` for rows with ``n = 0``."""
    total, n = sequence_stats(old, mask)
    return confidence_from_stats(total, n), n


def _group_sum(values: torch.Tensor, groups: GroupLayout) -> torch.Tensor:
    out = values.new_zeros(groups.num_groups)
    return out.index_add(0, groups.group_id, values)


def _group_max(values: torch.Tensor, groups: GroupLayout) -> torch.Tensor:
    out = values.new_full((groups.num_groups,), float("-inf"))
    return out.scatter_reduce(0, groups.group_id, values, "amax", include_self=True)


def _group_sizes(values: torch.Tensor, groups: GroupLayout) -> torch.Tensor:
    return _group_sum(torch.ones_like(values), groups)


def negative_groups(rewards: torch.Tensor, groups: GroupLayout) -> torch.Tensor:
    """Step 4: ``[num_groups]`` bool, True where every reward of the group is 0."""
    return _group_max(rewards, groups) == 0


def group_difficulty(pibar: torch.Tensor, rewards: torch.Tensor, groups: GroupLayout) -> torch.Tensor:
    """Step 5: ``D [num_groups]``.  Mixed groups ``max(G / sum_{pibar>0} r/pibar, 2 max pibar)``
    (the first term ``+inf`` when that sum is 0), negative groups ``2 max pibar``."""
    sizes = _group_sizes(pibar, groups)
    peak = _group_max(pibar, groups)
    inverse = torch.where(pibar > 0, rewards / torch.where(pibar > 0, pibar, 1), 0)
    total = _group_sum(inverse, groups)
    implied = torch.where(total > 0, sizes / torch.where(total > 0, total, 1), float("inf"))
    mixed = torch.maximum(implied, 2 * peak)
    return torch.where(negative_groups(rewards, groups), 2 * peak, mixed)


def calibrated_rewards(
    pibar: torch.Tensor,
    n: torch.Tensor,
    rewards: torch.Tensor,
    difficulty: torch.Tensor,
    groups: GroupLayout,
    length_gamma: Optional[float] = None,
) -> torch.Tensor:
    """Step 6 (or step 10 with ``length_gamma``): ``rt [B]``.

    ``rt = r - (1 - r) * penalty`` with ``penalty = (1/G) pibar / (D - pibar)``, or with
    ``length_gamma`` ``(1/n) pibar / max(gamma - pibar, LENGTH_GAMMA_MIN_GAP * gamma)``; the
    penalty is 0 for ``pibar = 0``.
    """
    live = pibar > 0
    if length_gamma is None:
        sizes = _group_sizes(pibar, groups)[groups.group_id]
        gap = difficulty[groups.group_id] - pibar
        penalty = pibar / (sizes * torch.where(live, gap, 1))
    else:
        gap = (length_gamma - pibar).clamp(min=LENGTH_GAMMA_MIN_GAP * length_gamma)
        penalty = pibar / (n.clamp(min=1) * gap)
    return rewards - (1 - rewards) * torch.where(live, penalty, 0)


def _normalised(values: torch.Tensor, groups: GroupLayout, scale: bool, eps: float) -> torch.Tensor:
    sizes = _group_sizes(values, groups)
    mean = (_group_sum(values, groups) / sizes)[groups.group_id]
    centred = values - mean
    if not scale:
        return centred
    var = _group_sum(centred * centred, groups) / (sizes - 1)
    return centred / (var.sqrt()[groups.group_id] + eps)


def advantages(
    rewards: torch.Tensor,
    rt: torch.Tensor,
    groups: GroupLayout,
    options: LensOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 7: ``(A [B], used [B])`` where ``used`` is the reward each row's advantage was
    computed from (``rt`` or ``r`` depending on the mode and the row's group type)."""
    negative = negative_groups(rewards, groups)[groups.group_id]
    used = torch.where(
        negative, rt if options.lens_negative else rewards, rt if options.lens_mixed else rewards
    )
    mixed_adv = _normalised(used, groups, options.scale_by_std, options.std_eps)
    if options.lens_negative:
        negative_adv = options.alpha * _normalised(used, groups, False, options.std_eps)
    else:
        negative_adv = mixed_adv
    return torch.where(negative, negative_adv, mixed_adv), used


def _times_ratio(a: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """``a * ratio``, 0 for ``a = 0`` whatever the ratio (one that overflows would give NaN),
    unless the ratio is NaN."""
    return torch.where((a == 0) & (ratio == ratio), 0, a * ratio)


def _surrogate_flat(ratio: torch.Tensor, a: torch.Tensor, low: float, high: float,
                    clip_ratio_c: Optional[float]) -> torch.Tensor:
    """Where ``-min(a r, a clip(r))`` (and its dual clip) has a zero gradient in ``r``: ``a = 0``
    (``r`` not NaN); the clipped branch strictly smaller with ``r`` outside ``[low, high]``;
    ``a < 0`` with the loss strictly past the cap ``-a c``."""
    unclipped = _times_ratio(a, ratio)
    clipped = a * ratio.clamp(low, high)
    flat = ((a == 0) & (ratio == ratio)) | ((clipped < unclipped) & ((ratio < low) | (ratio > high)))
    if clip_ratio_c is not None:
        flat |= (a < 0) & (-torch.minimum(unclipped, clipped) > -a * clip_ratio_c)
    return flat


def token_objective(
    logp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    options: LensOptions,
    ref: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Step 8: ``(loss [B, T], clipped [B, T] bool, k3 [B, T] or None)`` per token.

    Differentiable in ``logp``; ``old``, ``adv`` and ``ref`` are constants.

    Where the objective is flat in the ratio (``a = 0``, the clipped branch taken outside the
    clip range, past the dual-clip cap) the ratio is a constant: ``exp`` is differentiated
    only where the gradient is nonzero, so a ratio that overflows there (``old`` near -inf)
    gives an exact 0, not ``0 * inf = NaN``.  ``a = 0`` contributes 0 whatever the ratio (NaN
    excepted: NaN inputs give NaN, as on every backend).
    Values, and gradients elsewhere, are those of the plain formulas.
    """
    a = adv.unsqueeze(-1)
    low, high = 1 - options.eps_low, 1 + options.eps_high
    log_ratio = logp - old
    raw = torch.exp(log_ratio.detach())
    flat = _surrogate_flat(raw, a, low, high, options.clip_ratio_c)
    ratio = torch.where(flat, raw, torch.exp(torch.where(flat, 0, log_ratio)))
    clipped_ratio = ratio.clamp(low, high)
    unclipped = _times_ratio(a, ratio)
    unclipped_loss, clipped_loss = -unclipped, -a * clipped_ratio
    loss = -torch.minimum(unclipped, a * clipped_ratio)
    clipped = (clipped_loss > unclipped_loss).detach()
    if options.clip_ratio_c is not None:
        loss = torch.where(a < 0, torch.minimum(loss, -a * options.clip_ratio_c), loss)
    k3 = None
    if ref is not None:
        delta = ref - logp
        k3 = torch.exp(delta) - delta - 1
        if options.beta > 0:
            loss = loss + options.beta * k3
    return loss, clipped, k3


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_agg_mode: str) -> torch.Tensor:
    """Step 9: reduce ``[B, T]`` values over masked positions to a scalar (0 with no tokens)."""
    mask = mask.bool()
    values = torch.where(mask, per_token, 0)
    n = mask.sum(-1).to(values.dtype)
    rows = (n > 0).sum().to(values.dtype).clamp(min=1)
    if loss_agg_mode == "seq-mean-token-mean":
        return (values.sum(-1) / n.clamp(min=1)).sum() / rows
    if loss_agg_mode == "token-mean":
        return values.sum() / n.sum().clamp(min=1)
    if loss_agg_mode == "seq-mean-token-sum":
        return values.sum() / rows
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return values.sum() / max(mask.numel(), 1)  # B = 0 or T = 0: 0, not 0 / 0
    raise ValueError(f"loss_agg_mode: unknown {loss_agg_mode!r}")


class Calibration(NamedTuple):
    """Steps 3-7 for one batch (computed from detached ``old`` log-probs)."""

    confidence: torch.Tensor  # [B] pibar
    difficulty: torch.Tensor  # [num_groups] D
    negative: torch.Tensor  # [num_groups] bool
    advantages: torch.Tensor  # [B]
    calibrated_rewards: torch.Tensor  # [B] the reward each advantage was computed from


def calibrate_from_stats(
    logp_sum: torch.Tensor, n: torch.Tensor, rewards: torch.Tensor, groups: GroupLayout, options: LensOptions
) -> Calibration:
    """Steps 3-7 from per-row sums of masked old log-probs and token counts (``[B]`` each):
    what a distributed trainer gathers across ranks instead of ``[B, T]`` log-probs."""
    logp_sum, n = logp_sum.detach(), n.detach().to(logp_sum.dtype)
    groups = groups.tensors(logp_sum.device)
    pibar = confidence_from_stats(logp_sum, n)
    rewards = rewards.detach().to(logp_sum.dtype)
    difficulty = group_difficulty(pibar, rewards, groups)
    rt = calibrated_rewards(pibar, n, rewards, difficulty, groups, options.length_gamma)
    adv, used = advantages(rewards, rt, groups, options)
    return Calibration(pibar, difficulty, negative_groups(rewards, groups), adv, used)


def calibrate(
    old: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, groups: GroupLayout, options: LensOptions
) -> Calibration:
    """Steps 3-7: confidence, group type, difficulty, calibrated rewards, advantages."""
    return calibrate_from_stats(*sequence_stats(old.detach(), mask), rewards, groups, options)


def epilogue(
    logp: torch.Tensor,
    old: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    groups: Optional[GroupLayout],
    options: LensOptions,
    ref: Optional[torch.Tensor] = None,
    advantages: Optional[torch.Tensor] = None,
) -> EpilogueResult:
    """Steps 3-9 from token log-probs; ``loss`` is differentiable in ``logp``.

    Caller-given ``advantages [B]`` replace steps 3-7 (``groups`` is then unused, and the
    calibration fields of the result are None).
    """
    if advantages is None:
        cal = calibrate(old, mask, rewards, groups, options)
        adv = cal.advantages
    else:
        cal, adv = None, advantages.detach().to(logp.dtype)
    # Zero the masked-out positions before any arithmetic, so that even non-finite values
    # there get an exactly zero gradient (a where after exp() would pass 0 * inf = NaN back).
    live = mask.bool()
    keep = lambda t: None if t is None else torch.where(live, t, 0)  # noqa: E731
    per_token, clipped, k3 = token_objective(
        keep(logp), keep(old.detach()), adv, options, None if ref is None else keep(ref.detach())
    )
    dtype = logp.dtype
    return EpilogueResult(
        loss=aggregate(per_token, mask, options.loss_agg_mode),
        advantages=adv,
        calibrated_rewards=None if cal is None else cal.calibrated_rewards,
        confidence=None if cal is None else cal.confidence,
        difficulty=None if cal is None else cal.difficulty,
        negative_group_fraction=None if cal is None else cal.negative.to(dtype).sum() / max(cal.negative.numel(), 1),
        clip_fraction=aggregate(clipped.to(dtype), mask, "token-mean"),
        kl=None if k3 is None else aggregate(k3.detach(), mask, "token-mean"),
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
    check_values: bool = True,
    advantages: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float64,
):
    """The whole loss in plain PyTorch, same signature as :func:`lens_kernels.fused_lens_loss`.

    ``backend`` and ``inplace_backward`` are accepted and ignored, so the two are drop-in
    replacements; ``compute_dtype`` (default float64) is the precision of every step, which is
    how tests measure PyTorch's own error in bf16/fp16.  Arguments are checked exactly as in
    the fused function.
    """
    from .output import LensOutput
    from .validation import validate_loss

    inputs, options, checks = validate_loss(
        logits, target_ids, completion_mask, rewards, group_size, group_index, old_logprobs,
        ref_logprobs, advantages,
        dict(beta=beta, mode=mode, alpha=alpha, eps_low=eps_low, eps_high=eps_high,
             clip_ratio_c=clip_ratio_c, temperature=temperature, loss_agg_mode=loss_agg_mode,
             scale_by_std=scale_by_std, std_eps=std_eps, length_gamma=length_gamma,
             backend="torch", inplace_backward=False, check_values=check_values),
    )
    checks.settle()
    # The loss reads the log-probs of masked-out positions through logits zeroed there, so that
    # a NaN or all -inf row at such a position gets an exact zero gradient, not 0 * NaN; the
    # returned ``logprobs`` are 0 there, as on every backend.
    live = completion_mask.bool().unsqueeze(-1)
    logp = token_logprobs(torch.where(live, logits, 0), target_ids, temperature, compute_dtype)
    logp = torch.where(live.squeeze(-1), logp, 0)
    old = logp.detach() if old_logprobs is None else old_logprobs.to(compute_dtype)
    ref = None if ref_logprobs is None else ref_logprobs.to(compute_dtype)
    result = epilogue(
        logp, old, completion_mask, rewards.to(compute_dtype), inputs.groups, options, ref, advantages
    )
    return LensOutput.from_epilogue(result, logp.detach())
