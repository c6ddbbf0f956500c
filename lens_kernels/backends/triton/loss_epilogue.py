"""The LENS epilogue in Triton: SPEC steps 3-9 over ``[B, T]`` values, with ``d loss / d logp``.

Three kernels and a few ``[B]``-sized torch ops, no host sync:

1. ``_row_stats_kernel`` (grid ``B``): ``n_b`` and ``pibar_b = exp(sum_t m * old / n_b)``
   (0 when ``n_b = 0``).
2. ``_group_kernel`` (grid ``num_groups``, one group of at most ``BLOCK_G`` rows gathered
   through ``GroupLayout.order``): negative test, difficulty ``D``, calibrated rewards,
   group mean / Bessel std and the advantages of every mode.
3. ``_token_kernel`` (1-D grid over ``(row, chunk of BLOCK_T positions)``): ratio, clipped
   surrogate, dual clip, k3 KL, the per-row aggregation weight; writes ``dlogp`` (fp32) and
   one partial loss / clip count / KL sum per program, summed afterwards by ``torch.sum``
   (deterministic, no atomics).

Precision: inputs are read as fp32 and all arithmetic is float64, like the reference.  The
epilogue is O(B*T) work next to the O(B*T*V) vocabulary pass, so float64 costs nothing that
shows on a data-centre GPU, and it matters: the loss is often a near-cancelling sum (advantages
are zero-mean per group; on-policy it is 0 up to rounding), which fp32 would only match to
~1e-8 absolute, and ``1 / (std + eps)`` amplifies rounding in near-constant groups.  Float
options are annotated ``tl.float64`` (exact on a GPU; the CPU interpreter rounds them to fp32).

Conventions follow ``lens_kernels.reference`` (autograd of its formulas): ``torch.minimum``
splits its gradient on exact ties, ``clamp`` passes it on the closed interval, masked-out
positions are selected away with ``where`` (garbage or NaN there cannot leak), and every
count in a denominator is clamped to at least 1, so empty rows or an empty batch give 0.

Specialisation: ``T`` is the row stride of every ``[B, T]`` input, so it keeps Triton's
default integer specialisation (``T == 1``, ``T % 16 == 0``, other), which is what allows
128-bit loads when ``T`` is a multiple of 16; ``B`` is only a grid size and ``chunks_per_row``
is ``do_not_specialize``.  ``BLOCK_T`` is ``next_power_of_2(T)`` up to a cap and ``BLOCK_G``
``next_power_of_2(max group size)``: the epilogue kernels compile once per power-of-two bucket
of those (a dozen variants at most over all lengths up to the cap), never once per length.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...config import LENGTH_GAMMA_MIN_GAP, MODES, EpilogueResult, LossConfig
from ...groups import GroupLayout

_ROW_BLOCK = 2048
_TOKEN_BLOCK = 1024


@triton.jit
def _row_stats_kernel(old_ptr, mask_ptr, n_ptr, pibar_ptr, T, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    lanes = tl.arange(0, BLOCK_T)
    count = tl.zeros((BLOCK_T,), tl.float64)
    total = tl.zeros((BLOCK_T,), tl.float64)
    for start in range(0, T, BLOCK_T):
        cols = start + lanes
        inside = cols < T
        live = (tl.load(mask_ptr + base + cols, mask=inside, other=0.0) != 0) & inside
        old = tl.load(old_ptr + base + cols, mask=inside, other=0.0)
        count += tl.where(live, 1.0, 0.0)
        total += tl.where(live, old.to(tl.float64), 0.0)
    n = tl.sum(count, axis=0)
    mean = tl.sum(total, axis=0) / tl.maximum(n, 1.0)
    tl.store(n_ptr + row, n)
    tl.store(pibar_ptr + row, tl.where(n > 0, tl.exp(mean), 0.0))


@triton.jit
def _group_kernel(
    rewards_ptr, pibar_ptr, n_ptr, order_ptr, start_ptr, size_ptr,
    adv_ptr, used_ptr, difficulty_ptr, negative_ptr,
    alpha: tl.float64, std_eps: tl.float64, gamma: tl.float64, min_gap: tl.float64,
    LENS_MIXED: tl.constexpr, LENS_NEGATIVE: tl.constexpr,
    SCALE_BY_STD: tl.constexpr, USE_GAMMA: tl.constexpr, BLOCK_G: tl.constexpr,
):
    group = tl.program_id(0)
    first = tl.load(start_ptr + group)
    size = tl.load(size_ptr + group)
    lanes = tl.arange(0, BLOCK_G)
    valid = lanes < size
    rows = tl.load(order_ptr + first + lanes, mask=valid, other=0)
    r = tl.load(rewards_ptr + rows, mask=valid, other=0.0).to(tl.float64)
    pibar = tl.load(pibar_ptr + rows, mask=valid, other=0.0)
    g = size.to(tl.float64)

    # Steps 4-5: negative group, difficulty.
    negative = tl.max(tl.where(valid, r, 0.0), axis=0) == 0
    peak = tl.max(tl.where(valid, pibar, 0.0), axis=0)
    live = valid & (pibar > 0)
    inverse_sum = tl.sum(tl.where(live, r / tl.where(live, pibar, 1.0), 0.0), axis=0)
    implied = tl.where(inverse_sum > 0, g / tl.where(inverse_sum > 0, inverse_sum, 1.0), float("inf"))
    difficulty = tl.where(negative, 2 * peak, tl.maximum(implied, 2 * peak))

    # Step 6 (or 10): calibrated rewards.
    if USE_GAMMA:
        n = tl.load(n_ptr + rows, mask=valid, other=1.0)
        gap = tl.maximum(gamma - pibar, min_gap * gamma)
        penalty = pibar / (tl.maximum(n, 1.0) * gap)
    else:
        penalty = pibar / (g * tl.where(live, difficulty - pibar, 1.0))
    rt = r - (1 - r) * tl.where(live, penalty, 0.0)

    # Step 7: the reward each row's advantage uses, then group mean / Bessel std.
    if LENS_NEGATIVE:
        used_if_negative = rt
    else:
        used_if_negative = r
    if LENS_MIXED:
        used_if_mixed = rt
    else:
        used_if_mixed = r
    used = tl.where(negative, used_if_negative, used_if_mixed)
    centred = used - tl.sum(tl.where(valid, used, 0.0), axis=0) / g
    if SCALE_BY_STD:
        var = tl.sum(tl.where(valid, centred * centred, 0.0), axis=0) / (g - 1)
        normalised = centred / (tl.sqrt(var) + std_eps)
    else:
        normalised = centred
    if LENS_NEGATIVE:
        adv = tl.where(negative, alpha * centred, normalised)
    else:
        adv = normalised

    tl.store(adv_ptr + rows, adv, mask=valid)
    tl.store(used_ptr + rows, used, mask=valid)
    tl.store(difficulty_ptr + group, difficulty)
    tl.store(negative_ptr + group, tl.where(negative, 1.0, 0.0))


@triton.jit(do_not_specialize=["chunks_per_row"])
def _token_kernel(
    logp_ptr, old_ptr, mask_ptr, ref_ptr, adv_ptr, weight_ptr,
    dlogp_ptr, loss_part_ptr, clip_part_ptr, kl_part_ptr,
    T, chunks_per_row,
    clip_low: tl.float64, clip_high: tl.float64, clip_ratio_c: tl.float64, beta: tl.float64,
    DUAL_CLIP: tl.constexpr, HAS_REF: tl.constexpr, ADD_KL: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid // chunks_per_row
    cols = (pid - row * chunks_per_row) * BLOCK_T + tl.arange(0, BLOCK_T)
    inside = cols < T
    offs = row.to(tl.int64) * T + cols
    live = (tl.load(mask_ptr + offs, mask=inside, other=0.0) != 0) & inside
    # Masked-out positions become 0 before any arithmetic (as in the reference), whatever
    # they hold; loading under the static tail mask only keeps the loads vectorised.
    logp = tl.where(live, tl.load(logp_ptr + offs, mask=inside, other=0.0), 0.0).to(tl.float64)
    old = tl.where(live, tl.load(old_ptr + offs, mask=inside, other=0.0), 0.0).to(tl.float64)
    a = tl.load(adv_ptr + row)
    weight = tl.load(weight_ptr + row)

    # Step 8: -min(a * ratio, a * clip(ratio)); d/dlogp through ratio' = ratio.
    ratio = tl.exp(logp - old)
    clipped_ratio = tl.minimum(tl.maximum(ratio, clip_low), clip_high)
    unclipped = a * ratio
    clipped = a * clipped_ratio
    d_unclipped = a * ratio
    d_clipped = tl.where((ratio >= clip_low) & (ratio <= clip_high), d_unclipped, 0.0)
    d_min = tl.where(
        unclipped < clipped, d_unclipped,
        tl.where(clipped < unclipped, d_clipped, 0.5 * (d_unclipped + d_clipped)),
    )
    loss = -tl.minimum(unclipped, clipped)
    d_loss = -d_min
    is_clipped = -clipped > -unclipped
    if DUAL_CLIP:
        cap = -a * clip_ratio_c
        d_capped = tl.where(loss < cap, d_loss, tl.where(loss == cap, 0.5 * d_loss, 0.0))
        d_loss = tl.where(a < 0, d_capped, d_loss)
        loss = tl.where(a < 0, tl.minimum(loss, cap), loss)
    if HAS_REF:
        ref = tl.where(live, tl.load(ref_ptr + offs, mask=inside, other=0.0), 0.0)
        delta = ref.to(tl.float64) - logp
        exp_delta = tl.exp(delta)
        k3 = exp_delta - delta - 1
        if ADD_KL:
            loss = loss + beta * k3
            d_loss = d_loss + beta * (1 - exp_delta)
        tl.store(kl_part_ptr + pid, tl.sum(tl.where(live, k3, 0.0), axis=0))

    # Step 9: every masked token of row b weighs weight[b] in the aggregate.
    tl.store(dlogp_ptr + offs, tl.where(live, weight * d_loss, 0.0).to(tl.float32), mask=inside)
    tl.store(loss_part_ptr + pid, tl.sum(tl.where(live, weight * loss, 0.0), axis=0))
    tl.store(clip_part_ptr + pid, tl.sum(tl.where(live & is_clipped, 1.0, 0.0), axis=0))


def _row_weights(n: torch.Tensor, loss_agg_mode: str, positions: int) -> torch.Tensor:
    """Weight of each of row ``b``'s masked tokens in the aggregated loss (SPEC step 9)."""
    rows = (n > 0).sum().clamp(min=1)
    if loss_agg_mode == "seq-mean-token-mean":
        weight = 1 / (n.clamp(min=1) * rows)
    elif loss_agg_mode == "token-mean":
        weight = (1 / n.sum().clamp(min=1)).expand(n.shape)
    elif loss_agg_mode == "seq-mean-token-sum":
        weight = (1 / rows).expand(n.shape)
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        weight = torch.full_like(n, 1 / max(positions, 1))
    else:
        raise ValueError(f"loss_agg_mode: unknown {loss_agg_mode!r}")
    return weight.to(torch.float64).contiguous()


def _calibrate(old, mask, rewards, groups: GroupLayout, cfg: LossConfig):
    """Steps 3-7 in float64: ``(n, pibar, adv, used, difficulty, negative)``."""
    batch, seq = old.shape
    n = torch.empty(batch, device=old.device, dtype=torch.float64)
    pibar = torch.empty_like(n)
    _row_stats_kernel[(batch,)](
        old, mask, n, pibar, seq, BLOCK_T=min(triton.next_power_of_2(max(seq, 1)), _ROW_BLOCK)
    )
    adv = torch.empty_like(n)
    used = torch.empty_like(n)
    difficulty = torch.empty(groups.num_groups, device=old.device, dtype=torch.float64)
    negative = torch.empty(groups.num_groups, device=old.device, dtype=torch.float32)
    gamma = cfg.length_gamma
    _group_kernel[(groups.num_groups,)](
        rewards, pibar, n, groups.order, groups.start, groups.size,
        adv, used, difficulty, negative,
        float(cfg.alpha), float(cfg.std_eps), float(gamma or 0.0), LENGTH_GAMMA_MIN_GAP,
        LENS_MIXED=cfg.mode in ("lens", "lens-mixed-only"),
        LENS_NEGATIVE=cfg.mode in ("lens", "lens-negative-only"),
        SCALE_BY_STD=bool(cfg.scale_by_std),
        USE_GAMMA=gamma is not None,
        BLOCK_G=triton.next_power_of_2(groups.max_size),
    )
    return n, pibar, adv, used, difficulty, negative


def epilogue_forward(
    logp: torch.Tensor,
    old: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    groups: GroupLayout,
    ref: Optional[torch.Tensor],
    cfg: LossConfig,
) -> EpilogueResult:
    """SPEC steps 3-9 on ``[B, T]`` fp32 ``logp``/``old``/``mask`` (0/1) and ``ref`` (or None)."""
    assert cfg.mode in MODES, cfg.mode
    assert logp.dim() == 2 and logp.dtype == torch.float32
    for name, value in (("old", old), ("mask", mask), ("ref", ref)):
        assert value is None or (value.shape == logp.shape and value.device == logp.device), name
    assert rewards.shape == logp.shape[:1] and groups.order.shape == rewards.shape
    logp, old, mask = logp.contiguous(), old.float().contiguous(), mask.float().contiguous()
    ref = None if ref is None else ref.float().contiguous()
    batch, seq = logp.shape

    n, pibar, adv, used, difficulty, negative = _calibrate(old, mask, rewards.contiguous(), groups, cfg)

    weight = _row_weights(n, cfg.loss_agg_mode, batch * seq)
    block_t = min(triton.next_power_of_2(max(seq, 1)), _TOKEN_BLOCK)
    chunks_per_row = triton.cdiv(seq, block_t)
    programs = batch * chunks_per_row
    dlogp = torch.empty_like(logp)
    parts = torch.zeros((3, programs), device=logp.device, dtype=torch.float64)
    if programs > 0:
        _token_kernel[(programs,)](
            logp, old, mask, logp if ref is None else ref, adv, weight,
            dlogp, parts[0], parts[1], parts[2],
            seq, chunks_per_row,
            1 - cfg.eps_low, 1 + cfg.eps_high, float(cfg.clip_ratio_c or 0.0), float(cfg.beta),
            DUAL_CLIP=cfg.clip_ratio_c is not None,
            HAS_REF=ref is not None,
            ADD_KL=ref is not None and cfg.beta > 0,
            BLOCK_T=block_t,
            num_warps=4,
        )
    loss, clip_count, kl_sum = parts.sum(dim=1).unbind()
    tokens = n.sum().clamp(min=1)
    fp32 = lambda t: t.to(torch.float32)  # noqa: E731
    return EpilogueResult(
        loss=fp32(loss),
        dlogp=dlogp,
        advantages=fp32(adv),
        calibrated_rewards=fp32(used),
        confidence=fp32(pibar),
        difficulty=fp32(difficulty),
        negative_group_fraction=negative.mean(),
        clip_fraction=fp32(clip_count / tokens),
        kl=None if ref is None else fp32(kl_sum / tokens),
    )
