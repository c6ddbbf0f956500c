"""SPEC steps 3-7 and the aggregation weights of step 9, in one single-program Triton kernel.

The work is O(B * T) reads of the mask and old log-probs plus O(B) arithmetic: next to the
vocabulary pass it is noise, so one program does it all, in fixed order (deterministic, no
atomics, nothing to zero beforehand) and with no host sync, in four phases separated by
barriers:

1. rows: ``n_b`` (masked tokens) and ``pibar_b = exp(sum_t m * old / n_b)`` (0 when ``n_b = 0``);
2. groups (tiles of whole groups, contiguous or gathered through ``order``): negative test,
   difficulty ``D``, calibrated rewards ``rt`` and the advantages of every mode;
3. the per-token weight of each row in the aggregated loss (``loss_agg_mode``);
4. the batch scalars: masked tokens, rows with tokens, the negative-group fraction.

With caller-given advantages phase 2 is skipped and the kernels read them directly.
Arithmetic is float64, like the reference.  ``[B]`` scratch rows are float64 (kernels read
them); the user-facing outputs are written in fp32 here, so no conversion launches follow.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ...config import LENGTH_GAMMA_MIN_GAP, LOSS_AGG_MODES, LensOptions
from ...groups import GroupLayout
from .launch import launch, next_power_of_2
from .nan_math import nan_maximum

# scratch rows ([4, B] float64) and batch scalars ([4] float64)
N_ROW, PIBAR_ROW, ADV_ROW, WEIGHT_ROW = range(4)
TOKENS, LIVE_ROWS = range(2)
# the same, as constants a kernel can read
_N, _PIBAR, _ADV, _WEIGHT = (tl.constexpr(i) for i in range(4))
TOKENS_C, LIVE_ROWS_C = tl.constexpr(TOKENS), tl.constexpr(LIVE_ROWS)


@triton.jit
def _calibrate_kernel(
    old_ptr, live_ptr, rewards_ptr, order_ptr, start_ptr, size_ptr,
    scratch_ptr, totals_ptr, adv_out_ptr, used_out_ptr, conf_out_ptr, difficulty_out_ptr, negative_out_ptr,
    B, T, num_groups, group_size,
    stride_ob, stride_ot, stride_lb, stride_lt, stride_r,
    alpha: tl.float64, std_eps: tl.float64, gamma: tl.float64, min_gap: tl.float64,
    inv_num_groups: tl.float64, positions: tl.float64,
    HAS_OLD: tl.constexpr, GROUPS: tl.constexpr, CONTIGUOUS: tl.constexpr,
    LENS_MIXED: tl.constexpr, LENS_NEGATIVE: tl.constexpr, SCALE_BY_STD: tl.constexpr,
    USE_GAMMA: tl.constexpr, AGG: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_GRP: tl.constexpr, BLOCK_G: tl.constexpr,
):
    n_ptr = scratch_ptr + _N * B
    pibar_ptr = scratch_ptr + _PIBAR * B
    adv_ptr = scratch_ptr + _ADV * B
    weight_ptr = scratch_ptr + _WEIGHT * B

    # 1. rows
    tokens = tl.zeros((), tl.float64)
    live_rows = tl.zeros((), tl.float64)
    for r0 in range(0, B, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        in_rows = rows < B
        count = tl.zeros((BLOCK_R,), tl.float64)
        total = tl.zeros((BLOCK_R,), tl.float64)
        for t0 in range(0, T, BLOCK_T):
            cols = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            inside = in_rows[:, None] & (cols[None, :] < T)
            live = tl.load(live_ptr + rows[:, None] * stride_lb + cols[None, :] * stride_lt, mask=inside, other=0)
            live = (live != 0) & inside
            count += tl.sum(tl.where(live, 1.0, 0.0).to(tl.float64), axis=1)
            if HAS_OLD:
                old = tl.load(old_ptr + rows[:, None] * stride_ob + cols[None, :] * stride_ot, mask=inside, other=0.0)
                total += tl.sum(tl.where(live, old.to(tl.float64), 0.0), axis=1)
        pibar = tl.where(count > 0, tl.exp(total / tl.maximum(count, 1.0)), 0.0)
        tl.store(n_ptr + rows, count, mask=in_rows)
        if HAS_OLD:
            tl.store(pibar_ptr + rows, pibar, mask=in_rows)
            if GROUPS:
                tl.store(conf_out_ptr + rows, pibar.to(tl.float32), mask=in_rows)
        tokens += tl.sum(count, axis=0)
        live_rows += tl.sum(tl.where(count > 0, 1.0, 0.0).to(tl.float64), axis=0)
    tl.debug_barrier()

    # 2. groups
    if GROUPS:
        negatives = tl.zeros((), tl.float64)
        for g0 in range(0, num_groups, BLOCK_GRP):
            grp = (g0 + tl.arange(0, BLOCK_GRP)).to(tl.int64)
            in_grp = grp < num_groups
            lanes = tl.arange(0, BLOCK_G)
            if CONTIGUOUS:
                first = grp * group_size
                size = tl.where(in_grp, group_size, 0).to(tl.int64)
            else:
                first = tl.load(start_ptr + grp, mask=in_grp, other=0)
                size = tl.load(size_ptr + grp, mask=in_grp, other=0)
            valid = lanes[None, :] < size[:, None]
            if CONTIGUOUS:
                rows = first[:, None] + lanes[None, :]
            else:
                rows = tl.load(order_ptr + first[:, None] + lanes[None, :], mask=valid, other=0)
            r = tl.load(rewards_ptr + rows * stride_r, mask=valid, other=0.0).to(tl.float64)
            pibar = tl.load(pibar_ptr + rows, mask=valid, other=0.0)
            g = tl.maximum(size, 1).to(tl.float64)

            # steps 4-5: negative group, difficulty
            # a NaN reward makes the group mixed, as torch's amax (NaN) != 0 does (tl.max drops NaN)
            negative = tl.max(tl.where(valid, r, 0.0), axis=1) \
                + tl.sum(tl.where(valid & (r != r), float("nan"), 0.0), axis=1) == 0
            # a NaN confidence makes the group's peak NaN, as torch's amax does (tl.max drops NaN)
            peak = tl.max(tl.where(valid, pibar, 0.0), axis=1) \
                + tl.sum(tl.where(valid & (pibar != pibar), float("nan"), 0.0), axis=1)
            alive = valid & (pibar > 0)
            inverse_sum = tl.sum(tl.where(alive, r / tl.where(alive, pibar, 1.0), 0.0), axis=1)
            implied = tl.where(inverse_sum > 0, g / tl.where(inverse_sum > 0, inverse_sum, 1.0), float("inf"))
            difficulty = tl.where(negative, 2 * peak, nan_maximum(implied, 2 * peak))

            # step 6 (or 10): calibrated rewards
            if USE_GAMMA:
                n = tl.load(n_ptr + rows, mask=valid, other=1.0)
                gap = tl.maximum(gamma - pibar, min_gap * gamma)
                penalty = pibar / (tl.maximum(n, 1.0) * gap)
            else:
                penalty = pibar / (g[:, None] * tl.where(alive, difficulty[:, None] - pibar, 1.0))
            rt = r - (1 - r) * tl.where(alive, penalty, 0.0)

            # step 7: the reward each row's advantage uses, then group mean / Bessel std
            if LENS_NEGATIVE:
                used_if_negative = rt
            else:
                used_if_negative = r
            if LENS_MIXED:
                used_if_mixed = rt
            else:
                used_if_mixed = r
            used = tl.where(negative[:, None], used_if_negative, used_if_mixed)
            centred = used - (tl.sum(tl.where(valid, used, 0.0), axis=1) / g)[:, None]
            if SCALE_BY_STD:
                # padding groups (size 0) divide by 1, not 0/0
                var = tl.sum(tl.where(valid, centred * centred, 0.0), axis=1) / tl.where(in_grp, g - 1, 1.0)
                normalised = centred / (tl.sqrt(var) + std_eps)[:, None]
            else:
                normalised = centred
            if LENS_NEGATIVE:
                adv = tl.where(negative[:, None], alpha * centred, normalised)
            else:
                adv = normalised

            tl.store(adv_ptr + rows, adv, mask=valid)
            tl.store(adv_out_ptr + rows, adv.to(tl.float32), mask=valid)
            tl.store(used_out_ptr + rows, used.to(tl.float32), mask=valid)
            tl.store(difficulty_out_ptr + grp, difficulty.to(tl.float32), mask=in_grp)
            negatives += tl.sum(tl.where(negative & in_grp, 1.0, 0.0).to(tl.float64), axis=0)
        tl.store(negative_out_ptr, (negatives * inv_num_groups).to(tl.float32))

    # 3. per-token weight of each row in the aggregate (step 9)
    for r0 in range(0, B, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        in_rows = rows < B
        n = tl.load(n_ptr + rows, mask=in_rows, other=0.0)
        if AGG == 0:  # seq-mean-token-mean
            weight = tl.where(n > 0, 1.0 / (tl.maximum(n, 1.0) * tl.maximum(live_rows, 1.0)), 0.0)
        elif AGG == 1:  # token-mean
            weight = tl.zeros_like(n) + 1.0 / tl.maximum(tokens, 1.0)
        elif AGG == 2:  # seq-mean-token-sum
            weight = tl.zeros_like(n) + 1.0 / tl.maximum(live_rows, 1.0)
        else:  # seq-mean-token-sum-norm
            weight = tl.zeros_like(n) + 1.0 / tl.maximum(positions, 1.0)
        tl.store(weight_ptr + rows, weight, mask=in_rows)

    # 4. batch scalars
    tl.store(totals_ptr + TOKENS_C, tokens)
    tl.store(totals_ptr + LIVE_ROWS_C, live_rows)


class Calibration(NamedTuple):
    """What the calibration leaves for the kernels and the caller."""

    scratch: torch.Tensor  # [4, B] float64: n, pibar, advantages, weights
    totals: torch.Tensor  # [2] float64: masked tokens, rows with tokens
    advantages: torch.Tensor  # [B] the kernels' advantages (fp64 scratch row, or the caller's)
    outputs: Optional[tuple]  # fp32 (advantages, calibrated rewards, confidence, difficulty,
    #                           negative_group_fraction); None with caller-given advantages


def calibrate(
    old: Optional[torch.Tensor],
    live: torch.Tensor,
    rewards: torch.Tensor,
    groups: Optional[GroupLayout],
    options: LensOptions,
    advantages: Optional[torch.Tensor] = None,
    into: Optional[Calibration] = None,
) -> Calibration:
    """Steps 3-7 and the row weights.  ``old [B, T]`` (any float dtype and strides; None
    only in grpo mode or with caller-given ``advantages [B]``), ``live [B, T]`` bool,
    ``rewards [B]``.  ``into`` rewrites an earlier calibration's buffers (grpo on-policy: the
    confidences are filled in after the vocabulary pass has made the log-probs)."""
    batch, length = live.shape
    device = live.device
    has_groups = advantages is None
    if into is None:
        scratch = torch.empty((4, batch), device=device, dtype=torch.float64)
        totals = torch.empty(2, device=device, dtype=torch.float64)
        outputs = None
        if has_groups:
            num_groups = groups.num_groups
            outputs = tuple(torch.empty(batch, device=device) for _ in range(3)) + (
                torch.empty(num_groups, device=device), torch.empty((), device=device))
        into = Calibration(scratch, totals, scratch[ADV_ROW] if has_groups else advantages, outputs)
    scratch, totals, outputs = into.scratch, into.totals, into.outputs
    out = outputs if outputs is not None else (scratch,) * 5
    contiguous = groups is not None and groups.group_size > 0
    indexed = groups is not None and not contiguous
    max_size = groups.max_size if groups is not None else 1
    block_g = next_power_of_2(max_size)
    block_t = min(next_power_of_2(length), 256)
    gamma = options.length_gamma
    launch(
        _calibrate_kernel, (1,),
        old if old is not None else live, live, rewards,
        groups.order if indexed else live, groups.start if indexed else live, groups.size if indexed else live,
        scratch, totals, *out,
        batch, length, groups.num_groups if groups is not None else 0, groups.group_size if contiguous else 0,
        *(old.stride() if old is not None else (0, 0)), *live.stride(), rewards.stride(0),
        options.alpha, options.std_eps, float(gamma or 0.0), LENGTH_GAMMA_MIN_GAP,
        1.0 / max(groups.num_groups if groups is not None else 0, 1), float(batch * length),
        HAS_OLD=old is not None, GROUPS=has_groups, CONTIGUOUS=contiguous,
        LENS_MIXED=options.lens_mixed, LENS_NEGATIVE=options.lens_negative,
        SCALE_BY_STD=options.scale_by_std, USE_GAMMA=gamma is not None,
        AGG=LOSS_AGG_MODES.index(options.loss_agg_mode),
        BLOCK_R=max(1, 4096 // block_t), BLOCK_T=block_t,
        BLOCK_GRP=max(1, 1024 // block_g), BLOCK_G=block_g,
        num_warps=8,
    )
    return into
