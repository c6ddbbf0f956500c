"""The one-pass loss in Triton: log-prob, surrogate and gradient of a row in one program.

Used when each token's coefficient is known before the vocabulary pass (old log-probs given,
grpo mode, or caller-given advantages; see ``lens_kernels.backends.kernel_loss``).  One
program per ``(b, t)`` row: a masked-out row writes zeros and reads nothing; a live row runs
the online logsumexp, takes the target logit, computes the ratio, the clip decision and the
token's loss terms (float64), then sweeps the row again to write ``coef * (onehot - p)`` in
the gradient's dtype, into a new buffer or over the logits themselves (the second sweep of a
row mostly hits L2).  A zero coefficient (zero advantage, a clipped token) writes zeros
without the second read.  Addressing is 64-bit, ``T`` is not specialised and the temperature is
unbiased (``scale``), as in ``logprobs.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...config import LensOptions
from ..common.launch import launch
from .logprobs import check_layout, launch_shape, row_logprob, temperature_args, write_row_grad
from .token_math import surrogate_args, token_terms


@triton.jit(do_not_specialize=["T"])
def _fused_loss_kernel(
    logits_ptr, target_ptr, live_ptr, old_ptr, ref_ptr, adv_ptr, weight_ptr, grad_ptr, logp_ptr, parts_ptr,
    T, V, N,
    stride_b, stride_t, stride_v,
    stride_tgt_b, stride_tgt_t,
    stride_lb, stride_lt,
    stride_ob, stride_ot,
    stride_rb, stride_rt,
    stride_adv,
    stride_gb, stride_gt, stride_gv,
    inv_t_hi, inv_t_lo,
    clip_low: tl.float64, clip_high: tl.float64, clip_ratio_c: tl.float64, beta: tl.float64,
    SCALE: tl.constexpr, HAS_OLD: tl.constexpr, WRITE_GRAD: tl.constexpr,
    DUAL_CLIP: tl.constexpr, HAS_REF: tl.constexpr, ADD_KL: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    grad_row_ptr = grad_ptr + b * stride_gb + t * stride_gt
    live = tl.load(live_ptr + b * stride_lb + t * stride_lt) != 0
    if live:
        row_ptr = logits_ptr + b * stride_b + t * stride_t
        target = tl.load(target_ptr + b * stride_tgt_b + t * stride_tgt_t).to(tl.int64)
        logp, m, log_s, _ = row_logprob(row_ptr, target, V, stride_v, inv_t_hi, inv_t_lo, SCALE, BLOCK_V, False)
        logp64 = logp.to(tl.float64)
        if HAS_OLD:
            old = tl.load(old_ptr + b * stride_ob + t * stride_ot).to(tl.float64)
        else:
            old = logp64
        ref = logp64
        if HAS_REF:
            ref = tl.load(ref_ptr + b * stride_rb + t * stride_rt).to(tl.float64)
        a = tl.load(adv_ptr + b * stride_adv).to(tl.float64)
        weight = tl.load(weight_ptr + b)
        loss, d_loss, clipped, k3 = token_terms(
            logp64, old, a, ref, clip_low, clip_high, clip_ratio_c, beta, DUAL_CLIP, HAS_REF, ADD_KL
        )
        tl.store(logp_ptr + row, logp)
        tl.store(parts_ptr + row, weight * loss)
        tl.store(parts_ptr + N + row, clipped)
        tl.store(parts_ptr + 2 * N + row, k3)
        if WRITE_GRAD:
            coef = (weight * d_loss).to(tl.float32) * (inv_t_hi + inv_t_lo)
            write_row_grad(row_ptr, grad_row_ptr, target, V, stride_v, stride_gv, coef, 0.0, m, log_s, 0.0,
                           inv_t_hi, inv_t_lo, SCALE, BLOCK_V, False)
    else:
        tl.store(logp_ptr + row, 0.0)
        tl.store(parts_ptr + row, 0.0)
        tl.store(parts_ptr + N + row, 0.0)
        tl.store(parts_ptr + 2 * N + row, 0.0)
        if WRITE_GRAD:
            write_row_grad(logits_ptr, grad_row_ptr, 0, V, stride_v, stride_gv, 0.0, 0.0, 0.0, 0.0, 0.0,
                           inv_t_hi, inv_t_lo, SCALE, BLOCK_V, False)


def fused_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    live: torch.Tensor,
    old: Optional[torch.Tensor],
    ref: Optional[torch.Tensor],
    advantages: torch.Tensor,
    weights: torch.Tensor,
    grad: Optional[torch.Tensor],
    options: LensOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp [B, T] fp32, parts [3, B*T] float64)`` and, unless ``grad`` is None, the
    gradient of the loss written into ``grad [B, T, V]`` (a new buffer or the logits).

    ``live [B, T]`` bool; ``old``/``ref [B, T]`` float (any strides; ``old`` None: on-policy);
    ``advantages [B]`` (any float dtype), ``weights [B]`` float64 from the calibration.
    """
    check_layout(logits, target_ids)
    batch, seq, vocab = logits.shape
    rows = batch * seq
    logp = torch.empty((batch, seq), device=logits.device, dtype=torch.float32)
    parts = torch.empty((3, rows), device=logits.device, dtype=torch.float64)
    if rows == 0:
        return logp, parts
    block_v, num_warps = launch_shape(vocab, logits.element_size())
    scalars, flags = surrogate_args(options, ref is not None)
    hi, lo, scale_mode = temperature_args(options.inv_temperature)
    none2 = (0, 0)
    launch(
        _fused_loss_kernel, (rows,),
        logits, target_ids, live, logp if old is None else old, logp if ref is None else ref,
        advantages, weights, logits if grad is None else grad, logp, parts,
        seq, vocab, rows,
        *logits.stride(),
        *target_ids.stride(),
        *live.stride(),
        *(none2 if old is None else old.stride()),
        *(none2 if ref is None else ref.stride()),
        advantages.stride(0),
        *((0, 0, 0) if grad is None else grad.stride()),
        hi, lo,
        *scalars,
        SCALE=scale_mode, HAS_OLD=old is not None, WRITE_GRAD=grad is not None, **flags,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return logp, parts
