"""Fused-linear vocabulary pass in plain PyTorch: chunked matmuls with bounded temporaries.

Runs on any device and in float64 (for tests and gradcheck).  The logits
``z = (hidden @ weight.T + bias) * inv_t`` are computed one ``[rows, cols]`` rectangle at a
time in the accumulation dtype (fp32, float64 for float64 inputs), so temporaries stay below
about ``CHUNK_BYTES`` whatever ``N`` and ``V`` are:

* forward: per row chunk (live rows only, when the caller says which), an online logsumexp
  over the column chunks (running max and rescaled sum) and the target logit taken from the
  chunk that holds it;
* backward: only rows with ``g != 0`` are recomputed (one host sync to find them); per column
  chunk, ``dZ = g * inv_t * (onehot - p)``, ``dh += dZ @ W[cols]``, ``dW[cols] = dZ.T @ h``
  summed over the row chunks in the accumulation dtype and written once, ``dbias[cols] =
  dZ.sum(0)``.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

# Bound on the temporaries of one rectangle (about three [rows, cols] buffers live at once).
CHUNK_BYTES = 192 * 2**20
MAX_COLS = 8192


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _spans(total: int, step: int) -> Iterator[slice]:
    for start in range(0, total, step):
        yield slice(start, min(total, start + step))


def _steps(vocab: int, work: torch.dtype) -> tuple[int, int]:
    """``(rows, cols)`` per rectangle."""
    cols = max(1, min(vocab, MAX_COLS))
    rows = max(1, CHUNK_BYTES // (3 * cols * torch.finfo(work).bits // 8))
    return rows, cols


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], inv_t: float) -> torch.Tensor:
    z = h @ weight.T
    if bias is not None:
        z += bias
    return z if inv_t == 1.0 else z.mul_(inv_t)


def linear_logprobs_forward(hidden, weight, bias, target_ids, inv_temperature, live=None):
    """``(logp, lse)`` ``[N]`` in the accumulation dtype; ids outside ``[0, V)`` give NaN.
    Rows where ``live [N]`` (bool, optional) is False are never computed (found by one host
    sync) and get 0."""
    rows, _ = hidden.shape
    vocab = weight.shape[0]
    work = accumulation_dtype(hidden.dtype)
    logp = hidden.new_zeros(rows, dtype=work)
    lse = torch.zeros_like(logp)
    index = None if live is None else live.nonzero().squeeze(1)
    row_step, col_step = _steps(vocab, work)
    for r in _spans(rows if index is None else index.numel(), row_step):
        r = r if index is None else index[r]
        h = hidden[r].to(work)
        target = target_ids[r]
        m = h.new_full((h.shape[0],), float("-inf"))
        s = torch.zeros_like(m)
        z_target = torch.full_like(m, float("nan"))
        for c in _spans(vocab, col_step):
            z = _logits(h, weight[c].to(work), None if bias is None else bias[c].to(work), inv_temperature)
            m_new = torch.maximum(m, z.amax(1))
            shift = torch.where(m_new == float("-inf"), 0.0, m_new)
            s = s * torch.exp(m - shift) + torch.exp(z - shift[:, None]).sum(1)
            m = m_new
            inside = (target >= c.start) & (target < c.stop)
            picked = z.gather(1, (target - c.start).clamp(0, z.shape[1] - 1)[:, None])[:, 0]
            z_target = torch.where(inside, picked, z_target)
        lse[r] = m + torch.log(s)
        logp[r] = z_target - lse[r]
    return logp, lse


def linear_logprobs_backward(grad_logp, hidden, weight, bias, target_ids, lse, inv_temperature):
    """``(dh, dW, dbias or None)`` in the inputs' dtypes; rows with ``grad_logp == 0`` get
    ``dh = 0`` and add nothing to ``dW`` / ``dbias`` (their logits are never recomputed)."""
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    work = accumulation_dtype(hidden.dtype)
    live = (grad_logp != 0).nonzero().squeeze(1)
    coef = grad_logp[live].to(work) * inv_temperature
    dh = hidden.new_zeros((rows, dim), dtype=work)
    dw = torch.empty((vocab, dim), dtype=weight.dtype, device=weight.device)
    dbias = None if bias is None else torch.empty(vocab, dtype=bias.dtype, device=bias.device)
    row_step, col_step = _steps(vocab, work)
    for c in _spans(vocab, col_step):
        w = weight[c].to(work)
        b = None if bias is None else bias[c].to(work)
        dw_acc = w.new_zeros(w.shape)
        db_acc = w.new_zeros(w.shape[0])
        for r in _spans(live.numel(), row_step):
            idx = live[r]
            h = hidden[idx].to(work)
            dz = torch.exp(_logits(h, w, b, inv_temperature) - lse[idx, None].to(work))
            dz.mul_(-coef[r, None])
            target = target_ids[idx]
            inside = (target >= c.start) & (target < c.stop)
            local = (target - c.start).clamp(0, dz.shape[1] - 1)
            dz.scatter_add_(1, local[:, None], torch.where(inside, coef[r], 0.0)[:, None])
            dh.index_add_(0, idx, dz @ w)
            dw_acc += dz.T @ h
            db_acc += dz.sum(0)
        dw[c] = dw_acc.to(weight.dtype)
        if dbias is not None:
            dbias[c] = db_acc.to(bias.dtype)
    return dh.to(hidden.dtype), dw, dbias
