"""The token kernel of the two-pass loss in Triton (SPEC steps 8-9 on ``[B, T]`` log-probs).

Used on-policy in the LENS modes, where the advantages depend on the log-probs of the pass
itself.  A 1-D grid over ``(row, chunk of BLOCK_T positions)``: ratio, clipped surrogate, dual
clip, k3 KL (``token_math.token_terms``), times the row's aggregation weight; writes ``dlogp``
(fp32) and one partial loss / clip count / k3 sum per program, which
``backends.common.finalize`` sums (deterministic, no atomics).  Masked-out positions are
selected away before any arithmetic, whatever they hold.

Specialisation: ``T`` keeps Triton's default integer specialisation (the row stride of
``logp`` and ``dlogp``: 128-bit accesses when ``T % 16 == 0``); ``BLOCK_T`` is a power of two
up to a cap, so the kernel compiles once per bucket, never once per length.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...config import LensOptions
from ..common.launch import cdiv, launch, next_power_of_2
from .token_math import surrogate_args, token_terms

_TOKEN_BLOCK = 1024


@triton.jit(do_not_specialize=["chunks_per_row"])
def _token_loss_kernel(
    logp_ptr, old_ptr, live_ptr, ref_ptr, adv_ptr, weight_ptr,
    dlogp_ptr, parts_ptr,
    T, chunks_per_row, P,
    stride_ob, stride_ot, stride_lb, stride_lt, stride_rb, stride_rt, stride_adv,
    clip_low: tl.float64, clip_high: tl.float64, clip_ratio_c: tl.float64, beta: tl.float64,
    HAS_OLD: tl.constexpr, DUAL_CLIP: tl.constexpr, HAS_REF: tl.constexpr, ADD_KL: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // chunks_per_row).to(tl.int64)
    cols = ((pid - row * chunks_per_row) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    inside = cols < T
    offs = row * T + cols
    live = (tl.load(live_ptr + row * stride_lb + cols * stride_lt, mask=inside, other=0) != 0) & inside
    logp = tl.where(live, tl.load(logp_ptr + offs, mask=inside, other=0.0), 0.0).to(tl.float64)
    if HAS_OLD:
        old = tl.load(old_ptr + row * stride_ob + cols * stride_ot, mask=inside, other=0.0)
        old = tl.where(live, old.to(tl.float64), 0.0)
    else:
        old = logp
    ref = logp
    if HAS_REF:
        ref = tl.load(ref_ptr + row * stride_rb + cols * stride_rt, mask=inside, other=0.0)
        ref = tl.where(live, ref.to(tl.float64), 0.0)
    a = tl.load(adv_ptr + row * stride_adv).to(tl.float64)
    weight = tl.load(weight_ptr + row)
    loss, d_loss, clipped, k3 = token_terms(
        logp, old, a, ref, clip_low, clip_high, clip_ratio_c, beta, DUAL_CLIP, HAS_REF, ADD_KL
    )
    tl.store(dlogp_ptr + offs, tl.where(live, weight * d_loss, 0.0).to(tl.float32), mask=inside)
    tl.store(parts_ptr + pid, tl.sum(tl.where(live, weight * loss, 0.0), axis=0))
    tl.store(parts_ptr + P + pid, tl.sum(tl.where(live, clipped, 0.0), axis=0))
    tl.store(parts_ptr + 2 * P + pid, tl.sum(tl.where(live, k3, 0.0), axis=0))


def token_loss(
    logp: torch.Tensor,
    old: Optional[torch.Tensor],
    live: torch.Tensor,
    ref: Optional[torch.Tensor],
    advantages: torch.Tensor,
    weights: torch.Tensor,
    options: LensOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dlogp [B, T] fp32, parts [3, P] float64)`` from ``logp [B, T]`` fp32 contiguous,
    ``old``/``ref`` (any float dtype and strides; ``old`` None: on-policy), ``live`` bool,
    ``advantages [B]`` and the calibration's ``weights [B]`` float64."""
    batch, seq = logp.shape
    block_t = min(next_power_of_2(seq), _TOKEN_BLOCK)
    chunks_per_row = cdiv(seq, block_t)
    programs = batch * chunks_per_row
    dlogp = torch.empty_like(logp)
    parts = torch.empty((3, programs), device=logp.device, dtype=torch.float64)
    if programs == 0:
        return dlogp, parts
    scalars, flags = surrogate_args(options, ref is not None)
    launch(
        _token_loss_kernel, (programs,),
        logp, logp if old is None else old, live, logp if ref is None else ref, advantages, weights,
        dlogp, parts,
        seq, chunks_per_row, programs,
        *((0, 0) if old is None else old.stride()), *live.stride(),
        *((0, 0) if ref is None else ref.stride()), advantages.stride(0),
        *scalars,
        HAS_OLD=old is not None, **flags,
        BLOCK_T=block_t,
        num_warps=4,
    )
    return dlogp, parts
