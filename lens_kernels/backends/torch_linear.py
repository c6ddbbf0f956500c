"""Fused-linear vocabulary pass in plain PyTorch: chunked matmuls with bounded temporaries.

Runs on any device and in float64 (for tests and gradcheck).  The logits
``z = (hidden @ weight.T + bias) / t`` are computed one ``[rows, cols]`` rectangle at a time in
the accumulation dtype (fp32, float64 for float64 inputs), so temporaries stay below about
``CHUNK_BYTES`` whatever ``N`` and ``V`` are.  In fp32 the scaling is ``x * hi + x * lo`` with
``(hi, lo) = split_float(1 / t)`` (unbiased without an fma; ``x * fp32(1 / t)`` would carry
fp32(1/t)'s one-sided error into every log-prob); in float64 it is ``x * (1 / t)``.

* forward: per row chunk (live rows only, when the caller says which), an online logsumexp
  over the column chunks (running max ``m``, rescaled sum ``s = sum exp(z - m)``), the target
  logit taken from the chunk that holds it and, with ``entropy``, the rescaled
  ``u = sum exp(z - m) (z - m)`` in the same pass: ``H = log s - u / s`` (no cancellation
  between two large numbers; ``-inf`` logits add 0).  The logsumexp is kept as its two parts
  ``(m, log s)``: ``log p = (z - m) - log s`` stays exact for a token of probability near 1
  at ``|z| ~ 1e3``, where ``z - fp32(m + log s)`` would lose ``log s`` to the rounding of ``m``;
* backward: only rows with ``g != 0`` (or ``g_H != 0``) are recomputed (one host sync to find
  them); per column chunk, ``dZ = (g onehot - p (g + g_H (log p + H))) / t``,
  ``dh += dZ @ W[cols]``, ``dW[cols] = dZ.T @ h`` summed over the row chunks in the
  accumulation dtype and written once, ``dbias[cols] = dZ.sum(0)``.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from .torch_backend import divide_by_temperature

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
    """``(h @ weight.T + bias) * inv_t`` in h's dtype (fp32: by the fp32 parts of ``inv_t``)."""
    z = h @ weight.T
    if bias is not None:
        z += bias
    return divide_by_temperature(z, inv_t, inplace=True)


def _x_log_x(p: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """``p * log_p`` with 0 where ``p == 0`` (``-inf`` logits: never ``0 * -inf``)."""
    return torch.where(p > 0, p * log_p, 0.0)


def linear_logprobs_forward(hidden, weight, bias, target_ids, inv_temperature, live=None, entropy=False):
    """``(logp [N], lse [2, N], ent [N])`` in the accumulation dtype: ``lse`` the logsumexp
    as ``(m, log s)`` (it is their sum), ``ent`` None without ``entropy``; ids outside
    ``[0, V)`` give NaN.  Rows where ``live [N]`` (bool, optional) is
    False are never computed (found by one host sync) and get 0."""
    rows, _ = hidden.shape
    vocab = weight.shape[0]
    work = accumulation_dtype(hidden.dtype)
    logp = hidden.new_zeros(rows, dtype=work)
    lse = hidden.new_zeros((2, rows), dtype=work)
    ent = torch.zeros_like(logp) if entropy else None
    index = None if live is None else live.nonzero().squeeze(1)
    row_step, col_step = _steps(vocab, work)
    for r in _spans(rows if index is None else index.numel(), row_step):
        r = r if index is None else index[r]
        h = hidden[r].to(work)
        target = target_ids[r]
        m = h.new_full((h.shape[0],), float("-inf"))
        s = torch.zeros_like(m)
        u = torch.zeros_like(m)
        z_target = torch.full_like(m, float("nan"))
        for c in _spans(vocab, col_step):
            z = _logits(h, weight[c].to(work), None if bias is None else bias[c].to(work), inv_temperature)
            inside = (target >= c.start) & (target < c.stop)
            picked = z.gather(1, (target - c.start).clamp(0, z.shape[1] - 1)[:, None])[:, 0]
            z_target = torch.where(inside, picked, z_target)
            m_new = torch.maximum(m, z.amax(1))
            shift = torch.where(m_new == float("-inf"), 0.0, m_new)
            rescale = torch.exp(m - shift)
            z -= shift[:, None]
            e = torch.exp(z)
            if entropy:  # u's terms measured from the new max: exp(m - m') (u + (m - m') s)
                u = rescale * (u + torch.where(s > 0, (m - shift) * s, 0.0)) + _x_log_x(e, z).sum(1)
            s = s * rescale + e.sum(1)
            m = m_new
        log_s = torch.log(s)
        lse[0, r], lse[1, r] = m, log_s
        logp[r] = (z_target - m) - log_s
        if entropy:
            ent[r] = torch.log(s) - u / s
    return logp, lse, ent


def linear_logprobs_backward(grad_logp, hidden, weight, bias, target_ids, lse, inv_temperature,
                             grad_entropy=None, entropy=None):
    """``(dh, dW, dbias or None)`` in the inputs' dtypes from ``grad_logp [N]`` and, when given,
    ``grad_entropy [N]`` with the forward's ``entropy [N]`` (``lse [2, N]`` the forward's); rows with a zero gradient get
    ``dh = 0`` and add nothing to ``dW`` / ``dbias`` (their logits are never recomputed)."""
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    work = accumulation_dtype(hidden.dtype)
    with_entropy = grad_entropy is not None
    active = grad_logp != 0
    if with_entropy:
        active |= grad_entropy != 0
    live = active.nonzero().squeeze(1)
    coef = grad_logp[live].to(work) * inv_temperature
    if with_entropy:
        coef_h = grad_entropy[live].to(work) * inv_temperature
        ent = entropy[live].to(work)
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
            log_p = _logits(h, w, b, inv_temperature).sub_(lse[0, idx, None]).sub_(lse[1, idx, None])
            p = torch.exp(log_p)
            dz = p * -coef[r, None]
            if with_entropy:  # d H / d z_v = -p_v (log p_v + H)
                dz -= coef_h[r, None] * _x_log_x(p, log_p + ent[r, None])
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
