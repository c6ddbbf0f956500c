"""Vocabulary pass in Triton: token log-probs (and entropies) and their gradient without a
``[B, T, V]`` fp32 buffer.

One program per ``(b, t)`` row on a 1-D grid over ``N = B * T`` rows, so no grid dimension
bounds ``T``.  Each program streams its row of ``V`` logits in ``BLOCK_V`` chunks:

* forward (``row_logprob``): an online logsumexp in fp32 (running max ``m`` and rescaled sum
  ``s``) and, with ``ENTROPY``, the rescaled ``u = sum exp(z - m) (z - m)`` in the same sweep
  (``H = log s - u / s``: no cancellation between two large numbers), then one extra load of
  the target logit; writes ``logp`` (and ``ent``), ``[B, T]`` fp32, and ``lse = m + log s``
  in float64 (the two fp32 parts exactly), only; rows whose completion mask is 0 are not read;
* backward (``write_row_grad``): recomputes ``log p = (z - hi) - lo`` from the saved ``lse``
  split into fp32 parts (a near-certain token's ``1 - p`` stays exact at ``|z| ~ 1e3``, which
  ``z - fp32(lse)`` rounds to the last place of ``lse``), ``p = exp(log p)``, and
  writes ``inv_t * (g * (onehot - p) - g_H * p * (log p + H))`` in the logits' dtype (the
  entropy term only with ``ENTROPY``: without it the kernel is the log-prob backward alone), into
  a new contiguous tensor or back into the logits' own storage; rows whose coefficients are all
  zero store zeros without reading the logits (padding fast path, NaN-safe).

``row_logprob`` and ``write_row_grad`` are shared with the one-pass loss (``fused_loss.py``).

Temperature: ``z = fma(x, hi, x * lo)`` with ``(hi, lo) = config.split_float(1 / t)``
(``scale``); the ``SCALE`` constexpr is 0 for ``t = 1`` (``z = x``), 1 when ``lo = 0``
(``z = x * hi``, exact ``1 / t`` in fp32) and 2 otherwise, so an infinite logit never meets
``inf * 0``.  Gradients carry ``hi + lo`` (the nearest fp32 of ``1 / t``).

Addressing: the row index and ``b``, ``t`` are int64 before they meet a stride, and the
vocabulary offset is widened to int64 before it is multiplied by ``stride_v``, so
``B * T * V >= 2**31`` and arbitrary strides (e.g. ``logits[:, :-1, :]``, never copied) work.
Packed tokens arrive as ``[1, N, V]``.

Specialisation: ``T`` is ``do_not_specialize`` (it only feeds ``row // T``), so a new
sequence length never recompiles.  ``V`` and the strides keep Triton's default integer
specialisation (value 1, divisibility by 16): that is what lets the compiler prove the
vocabulary axis contiguous and the chunk mask 16-aligned and emit 128-bit loads.  It costs at
most a handful of variants (``V % 16 == 0`` or not, ``stride_v == 1`` or not, and int32/int64
strides past ``2**31``), never one per ``V``.

Launch shape (unmeasured on GPU so far): ``BLOCK_V`` is 8192 for 2-byte logits and 4096 for
fp32 (16 KiB per chunk), capped at ``next_power_of_2(V)``, with ``BLOCK_V // 512`` warps
(1 to 16), i.e. 16 elements per thread per chunk.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...config import split_float
from ..common.launch import launch, next_power_of_2

_CHUNK_BYTES = 16384
_MAX_WARPS = 16


def temperature_args(inv_temperature: float) -> tuple[float, float, int]:
    """``(hi, lo, SCALE)`` for :func:`scale` from the float64 ``1 / temperature``."""
    hi, lo = split_float(float(inv_temperature))
    return hi, lo, 0 if inv_temperature == 1.0 else (1 if lo == 0.0 else 2)


@triton.jit
def scale(x, inv_t_hi, inv_t_lo, SCALE: tl.constexpr):
    """``x / t`` in fp32 without a one-sided bias: ``fma(x, hi, x * lo)`` (``SCALE`` 2),
    ``x * hi`` (1: ``1 / t`` exact in fp32) or ``x`` (0: ``t = 1``)."""
    x = x.to(tl.float32)
    if SCALE == 2:
        x = tl.fma(x, inv_t_hi, x * inv_t_lo)
    elif SCALE == 1:
        x = x * inv_t_hi
    return x


@triton.jit
def row_logprob(row_ptr, target, V, stride_v, inv_t_hi, inv_t_lo, SCALE: tl.constexpr, BLOCK_V: tl.constexpr,
                ENTROPY: tl.constexpr):
    """``(logp, m, log_s, ent)`` of one row of logits: an online logsumexp in fp32 (running
    max ``m``, rescaled sum ``s``, and with ``ENTROPY`` the rescaled ``u = sum exp(z - m)
    (z - m)``; ``ent`` is 0 without it), then one load of the target logit.  The logsumexp is
    ``m + log_s``; ``logp = (z_target - m) - log_s`` keeps the precision of a near-certain
    token's log-prob, which ``z_target - lse`` rounds to the last place of ``lse``.  An id
    outside ``[0, V)`` reads nothing and gives NaN (ids are range-checked at the public
    boundary)."""
    lanes = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    u = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + lanes
        x = tl.load(row_ptr + cols.to(tl.int64) * stride_v, mask=cols < V, other=float("-inf"))
        z = scale(x, inv_t_hi, inv_t_lo, SCALE)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # A chunk of only -inf (with nothing finite before it) must not turn into -inf - -inf.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m - shift)
        e = tl.exp(z - shift)
        if ENTROPY:
            # u's terms measured from the new max: exp(m - m') (u + (m - m') s); exp(-inf) * -inf
            # (a -inf logit, or the empty start) adds 0, never NaN.
            moved = tl.where(s > 0, (m - shift) * s, 0.0)
            u = rescale * (u + moved) + tl.sum(tl.where(e > 0, e * (z - shift), 0.0), axis=0)
        s = s * rescale + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    ent = tl.zeros((), tl.float32)
    if ENTROPY:
        ent = log_s - u / s
    valid = (target >= 0) & (target < V)
    x_target = tl.load(row_ptr + target * stride_v, mask=valid, other=float("nan"))
    return (scale(x_target, inv_t_hi, inv_t_lo, SCALE) - m) - log_s, m, log_s, ent


@triton.jit
def write_row_grad(row_ptr, grad_row_ptr, target, V, stride_v, stride_gv, coef, coef_h, lse_hi, lse_lo, ent,
                   inv_t_hi, inv_t_lo, SCALE: tl.constexpr, BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr):
    """``grad_row = coef * (onehot(target) - p) - coef_h * p * (log p + ent)`` in the
    gradient's dtype, ``log p = (z - lse_hi) - lse_lo`` (the logsumexp in two fp32 parts: ``m``
    and ``log s`` in the one-pass loss, a saved float64 ``lse`` split in the backward), with
    ``coef`` / ``coef_h`` the row's ``d loss / d logp`` / ``d loss / d ent`` times ``1 / t``
    (the ``coef_h`` term only with ``ENTROPY``; ``p = 0`` adds exactly 0).  Zero coefficients
    write zeros without reading the logits (padding and zero-advantage rows, NaN-safe)."""
    lanes = tl.arange(0, BLOCK_V)
    idle = coef == 0.0
    if ENTROPY:
        idle = idle & (coef_h == 0.0)
    if idle:
        zeros = tl.zeros((BLOCK_V,), tl.float32).to(grad_row_ptr.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            cols = start + lanes
            tl.store(grad_row_ptr + cols.to(tl.int64) * stride_gv, zeros, mask=cols < V)
    else:
        for start in range(0, V, BLOCK_V):
            cols = start + lanes
            in_row = cols < V
            x = tl.load(row_ptr + cols.to(tl.int64) * stride_v, mask=in_row, other=float("-inf"))
            log_p = (scale(x, inv_t_hi, inv_t_lo, SCALE) - lse_hi) - lse_lo
            p = tl.exp(log_p)
            if ENTROPY:
                weight = coef + coef_h * (log_p + ent)
                grad = tl.where(cols == target, coef, 0.0) - tl.where(p > 0, p * weight, 0.0)
            else:
                grad = coef * (tl.where(cols == target, 1.0, 0.0) - p)
            tl.store(grad_row_ptr + cols.to(tl.int64) * stride_gv, grad.to(grad_row_ptr.dtype.element_ty), mask=in_row)


@triton.jit(do_not_specialize=["T"])
def _logprobs_fwd_kernel(
    logits_ptr, target_ptr, live_ptr, logp_ptr, lse_ptr, ent_ptr,
    T, V,
    stride_b, stride_t, stride_v,
    stride_tgt_b, stride_tgt_t,
    stride_lb, stride_lt,
    inv_t_hi, inv_t_lo,
    SCALE: tl.constexpr,
    HAS_LIVE: tl.constexpr,
    ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    live = True
    if HAS_LIVE:
        live = tl.load(live_ptr + b * stride_lb + t * stride_lt) != 0
    if live:
        target = tl.load(target_ptr + b * stride_tgt_b + t * stride_tgt_t).to(tl.int64)
        logp, m, log_s, ent = row_logprob(logits_ptr + b * stride_b + t * stride_t, target, V, stride_v,
                                          inv_t_hi, inv_t_lo, SCALE, BLOCK_V, ENTROPY)
        tl.store(logp_ptr + row, logp)
        tl.store(lse_ptr + row, m.to(tl.float64) + log_s.to(tl.float64))
        if ENTROPY:
            tl.store(ent_ptr + row, ent)
    else:  # a masked-out row is never read
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if ENTROPY:
            tl.store(ent_ptr + row, 0.0)


@triton.jit(do_not_specialize=["T"])
def _logprobs_bwd_kernel(
    grad_logp_ptr, scale_ptr, grad_ent_ptr, ent_ptr, logits_ptr, target_ptr, lse_ptr, grad_ptr,
    T, V,
    stride_b, stride_t, stride_v,
    stride_tgt_b, stride_tgt_t,
    stride_gb, stride_gt, stride_gv,
    inv_t_hi, inv_t_lo,
    SCALE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    inv_t = inv_t_hi + inv_t_lo
    g = tl.load(grad_logp_ptr + row)
    g_h = tl.zeros((), tl.float32)
    ent = tl.zeros((), tl.float32)
    if ENTROPY:
        g_h = tl.load(grad_ent_ptr + row)
        ent = tl.load(ent_ptr + row)
    if HAS_SCALE:
        factor = tl.load(scale_ptr).to(tl.float32)
        g = g * factor
        g_h = g_h * factor
    target = tl.load(target_ptr + b * stride_tgt_b + t * stride_tgt_t).to(tl.int64)
    lse = tl.load(lse_ptr + row).to(tl.float64)  # float64, or fp32 (then lse_lo is 0)
    lse_hi = lse.to(tl.float32)
    lse_lo = (lse - lse_hi.to(tl.float64)).to(tl.float32)
    write_row_grad(
        logits_ptr + b * stride_b + t * stride_t, grad_ptr + b * stride_gb + t * stride_gt,
        target, V, stride_v, stride_gv, g * inv_t, g_h * inv_t, lse_hi, lse_lo, ent, inv_t_hi, inv_t_lo, SCALE,
        BLOCK_V, ENTROPY,
    )


def launch_shape(vocab: int, element_size: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for a row of ``vocab`` logits of ``element_size`` bytes."""
    block_v = min(next_power_of_2(vocab), _CHUNK_BYTES // element_size)
    return block_v, max(1, min(_MAX_WARPS, block_v // 512))


def check_layout(logits: torch.Tensor, target_ids: torch.Tensor) -> None:
    assert logits.dim() == 3, "logits must be [B, T, V]"
    assert logits.dtype in (torch.float32, torch.bfloat16, torch.float16), logits.dtype
    assert target_ids.shape == logits.shape[:2] and target_ids.dtype == torch.int64
    assert target_ids.device == logits.device


def logprobs_forward(
    logits: torch.Tensor, target_ids: torch.Tensor, inv_temperature: float, live: Optional[torch.Tensor] = None,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(logp, lse, ent)``, ``[B, T]`` contiguous (``lse`` float64, the others fp32), for
    ``z = logits / temperature`` (``inv_temperature`` the float64 ``1 / t``); ``ent`` (the
    softmax's entropy, from the same sweep) None unless ``entropy``; rows where ``live [B, T]``
    (bool, any strides) is 0 are not read and get 0."""
    check_layout(logits, target_ids)
    batch, seq, vocab = logits.shape
    logp = torch.empty((batch, seq), device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(logp, dtype=torch.float64)
    ent = torch.empty_like(logp) if entropy else None
    rows = batch * seq
    if rows == 0:
        return logp, lse, ent
    block_v, num_warps = launch_shape(vocab, logits.element_size())
    hi, lo, scale_mode = temperature_args(inv_temperature)
    launch(
        _logprobs_fwd_kernel, (rows,),
        logits, target_ids, logp if live is None else live, logp, lse, logp if ent is None else ent,
        seq, vocab,
        *logits.stride(),
        *target_ids.stride(),
        *(live.stride() if live is not None else (0, 0)),
        hi, lo,
        SCALE=scale_mode,
        HAS_LIVE=live is not None,
        ENTROPY=entropy,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return logp, lse, ent


def logprobs_backward(
    grad_logp: torch.Tensor,
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    lse: torch.Tensor,
    inv_temperature: float,
    inplace: bool,
    grad_scale: Optional[torch.Tensor] = None,
    grad_entropy: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``grad_scale / t * (grad_logp * (onehot - p) - grad_entropy * p * (log p + entropy))`` in
    ``logits.dtype`` (``grad_scale`` a 0-dim tensor read on the device, or None for 1; the
    entropy term only with ``grad_entropy``, ``entropy`` the forward's; ``lse`` the forward's
    float64 logsumexp, or an fp32 one): a new contiguous tensor, or (``inplace=True``) written
    over ``logits`` itself, which is returned."""
    check_layout(logits, target_ids)
    assert grad_logp.shape == logits.shape[:2] and grad_logp.dtype == torch.float32
    assert lse.shape == logits.shape[:2] and lse.dtype in (torch.float64, torch.float32)
    has_entropy = grad_entropy is not None
    if has_entropy:
        assert entropy is not None and grad_entropy.shape == entropy.shape == lse.shape
        grad_entropy, entropy = grad_entropy.to(torch.float32).contiguous(), entropy.contiguous()
    grad_logp = grad_logp.contiguous()
    lse = lse.contiguous()
    batch, seq, vocab = logits.shape
    grad = logits if inplace else torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    rows = batch * seq
    if rows == 0:
        return grad
    block_v, num_warps = launch_shape(vocab, logits.element_size())
    hi, lo, scale_mode = temperature_args(inv_temperature)
    launch(
        _logprobs_bwd_kernel, (rows,),
        grad_logp, grad_logp if grad_scale is None else grad_scale,
        grad_entropy if has_entropy else grad_logp, entropy if has_entropy else grad_logp,
        logits, target_ids, lse, grad,
        seq, vocab,
        *logits.stride(),
        *target_ids.stride(),
        *grad.stride(),
        hi, lo,
        SCALE=scale_mode,
        HAS_SCALE=grad_scale is not None,
        ENTROPY=has_entropy,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return grad
