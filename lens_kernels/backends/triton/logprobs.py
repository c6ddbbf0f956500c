"""Vocabulary pass in Triton: token log-probs and their gradient without a ``[B, T, V]`` fp32 buffer.

One program per ``(b, t)`` row on a 1-D grid over ``N = B * T`` rows, so no grid dimension
bounds ``T``.  Each program streams its row of ``V`` logits in ``BLOCK_V`` chunks:

* forward (``row_logprob``): an online logsumexp in fp32 (running max ``m`` and rescaled sum
  ``s``), then one extra load of the target logit; writes ``logp`` and ``lse`` (``[B, T]`` fp32)
  only; rows whose completion mask is 0 are not read;
* backward (``write_row_grad``): recomputes ``p = exp(z - lse)`` from the saved ``lse`` and
  writes ``grad_logp * grad_scale * inv_t * (onehot - p)`` in the logits' dtype, into a new
  contiguous tensor or back into the logits' own storage; rows with a zero coefficient store
  zeros without reading the logits (padding fast path, NaN-safe).

``row_logprob`` and ``write_row_grad`` are shared with the one-pass loss (``fused_loss.py``).

Addressing: the row index and ``b``, ``t`` are int64 before they meet a stride, and the
vocabulary offset is widened to int64 before it is multiplied by ``stride_v``, so
``B * T * V >= 2**31`` and arbitrary strides (e.g. ``logits[:, :-1, :]``, never copied) work.

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

_CHUNK_BYTES = 16384
_MAX_WARPS = 16


@triton.jit
def row_logprob(row_ptr, target, V, stride_v, inv_t, BLOCK_V: tl.constexpr):
    """``(logp, lse)`` of one row of logits: an online logsumexp in fp32 (running max ``m``
    and rescaled sum ``s``), then one load of the target logit.  An id outside ``[0, V)``
    reads nothing and gives NaN (ids are range-checked at the public boundary)."""
    lanes = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + lanes
        z = tl.load(row_ptr + cols.to(tl.int64) * stride_v, mask=cols < V, other=float("-inf"))
        z = z.to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # A chunk of only -inf (with nothing finite before it) must not turn into -inf - -inf.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
        m = m_new
    lse = m + tl.log(s)
    valid = (target >= 0) & (target < V)
    z_target = tl.load(row_ptr + target * stride_v, mask=valid, other=float("nan")).to(tl.float32) * inv_t
    return z_target - lse, lse


@triton.jit
def write_row_grad(row_ptr, grad_row_ptr, target, V, stride_v, stride_gv, coef, lse, inv_t, BLOCK_V: tl.constexpr):
    """``grad_row = coef * (onehot(target) - exp(z - lse))`` in the gradient's dtype, with
    ``coef`` the row's ``d loss / d logp`` times ``inv_t``; a zero ``coef`` writes zeros
    without reading the logits (padding and zero-advantage rows, NaN-safe)."""
    lanes = tl.arange(0, BLOCK_V)
    if coef == 0.0:
        zeros = tl.zeros((BLOCK_V,), tl.float32).to(grad_row_ptr.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            cols = start + lanes
            tl.store(grad_row_ptr + cols.to(tl.int64) * stride_gv, zeros, mask=cols < V)
    else:
        for start in range(0, V, BLOCK_V):
            cols = start + lanes
            in_row = cols < V
            z = tl.load(row_ptr + cols.to(tl.int64) * stride_v, mask=in_row, other=float("-inf"))
            p = tl.exp(z.to(tl.float32) * inv_t - lse)
            grad = coef * (tl.where(cols == target, 1.0, 0.0) - p)
            tl.store(grad_row_ptr + cols.to(tl.int64) * stride_gv, grad.to(grad_row_ptr.dtype.element_ty), mask=in_row)


@triton.jit(do_not_specialize=["T"])
def _logprobs_fwd_kernel(
    logits_ptr, target_ptr, live_ptr, logp_ptr, lse_ptr,
    T, V,
    stride_b, stride_t, stride_v,
    stride_tgt_b, stride_tgt_t,
    stride_lb, stride_lt,
    inv_t,
    HAS_LIVE: tl.constexpr,
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
        logp, lse = row_logprob(logits_ptr + b * stride_b + t * stride_t, target, V, stride_v, inv_t, BLOCK_V)
        tl.store(logp_ptr + row, logp)
        tl.store(lse_ptr + row, lse)
    else:  # a masked-out row is never read
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)


@triton.jit(do_not_specialize=["T"])
def _logprobs_bwd_kernel(
    grad_logp_ptr, scale_ptr, logits_ptr, target_ptr, lse_ptr, grad_ptr,
    T, V,
    stride_b, stride_t, stride_v,
    stride_tgt_b, stride_tgt_t,
    stride_gb, stride_gt, stride_gv,
    inv_t,
    HAS_SCALE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    g = tl.load(grad_logp_ptr + row)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr).to(tl.float32)
    target = tl.load(target_ptr + b * stride_tgt_b + t * stride_tgt_t).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    write_row_grad(
        logits_ptr + b * stride_b + t * stride_t, grad_ptr + b * stride_gb + t * stride_gt,
        target, V, stride_v, stride_gv, g * inv_t, lse, inv_t, BLOCK_V,
    )


def launch_shape(vocab: int, element_size: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for a row of ``vocab`` logits of ``element_size`` bytes."""
    block_v = min(triton.next_power_of_2(vocab), _CHUNK_BYTES // element_size)
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
    """``(logp, lse)``, both ``[B, T]`` fp32 contiguous, for ``z = logits * inv_temperature``;
    rows where ``live [B, T]`` (bool, any strides) is 0 are not read and get 0."""
    check_layout(logits, target_ids)
    if entropy:
        raise NotImplementedError("entropy: not yet in the Triton kernel")
    batch, seq, vocab = logits.shape
    logp = torch.empty((batch, seq), device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    rows = batch * seq
    if rows == 0:
        return logp, lse, None
    block_v, num_warps = launch_shape(vocab, logits.element_size())
    _logprobs_fwd_kernel[(rows,)](
        logits, target_ids, logp if live is None else live, logp, lse,
        seq, vocab,
        *logits.stride(),
        *target_ids.stride(),
        *(live.stride() if live is not None else (0, 0)),
        float(inv_temperature),
        HAS_LIVE=live is not None,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return logp, lse, None


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
    """``grad_logp * grad_scale * inv_t * (onehot - softmax(z))`` in ``logits.dtype`` (``grad_scale``
    a 0-dim tensor read on the device, or None for 1): a new contiguous tensor, or
    (``inplace=True``) written over ``logits`` itself, which is returned."""
    check_layout(logits, target_ids)
    if grad_entropy is not None:
        raise NotImplementedError("entropy: not yet in the Triton kernel")
    assert grad_logp.shape == logits.shape[:2] and grad_logp.dtype == torch.float32
    assert lse.shape == logits.shape[:2] and lse.dtype == torch.float32
    grad_logp = grad_logp.contiguous()
    lse = lse.contiguous()
    batch, seq, vocab = logits.shape
    grad = logits if inplace else torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    rows = batch * seq
    if rows == 0:
        return grad
    block_v, num_warps = launch_shape(vocab, logits.element_size())
    _logprobs_bwd_kernel[(rows,)](
        grad_logp, grad_logp if grad_scale is None else grad_scale, logits, target_ids, lse, grad,
        seq, vocab,
        *logits.stride(),
        *target_ids.stride(),
        *grad.stride(),
        float(inv_temperature),
        HAS_SCALE=grad_scale is not None,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return grad
