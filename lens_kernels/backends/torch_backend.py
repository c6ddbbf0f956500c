"""Torch backend: the vocabulary pass in row chunks, the epilogue from ``reference``.

Works on any device.  The forward keeps ``[B, T]`` fp32 log-probs and logsumexps (and
entropies when asked); the backward recomputes the softmax chunk by chunk from the saved
logsumexp.  Temporaries are
bounded by ``CHUNK_BYTES`` whatever the problem size.  The epilogue runs
:func:`lens_kernels.reference.epilogue` in float64 and takes ``d loss / d logp`` from autograd,
so its formulas are the reference's own.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from .. import reference
from ..config import EpilogueResult, LensOptions, split_float
from ..groups import GroupLayout

# Bound on the fp32 temporaries of one chunk (about three [rows, V] fp32 buffers live at once).
CHUNK_BYTES = 192 * 2**20


def is_available(device: Optional[torch.device] = None) -> bool:
    return True


def _chunks(batch: int, length: int, vocab: int) -> Iterator[tuple[slice, slice]]:
    """Rectangles ``(rows of B, positions of T)`` of at most ``CHUNK_BYTES / (12 V)`` rows,
    so that strided logits (e.g. ``logits[:, :-1]``) are sliced, never copied whole."""
    rows = max(1, CHUNK_BYTES // (12 * vocab))
    if batch == 0 or length == 0:
        return
    if rows >= length:
        step = rows // length
        for b in range(0, batch, step):
            yield slice(b, b + step), slice(0, length)
    else:
        for b in range(batch):
            for t in range(0, length, rows):
                yield slice(b, b + 1), slice(t, t + rows)


def divide_by_temperature(z: torch.Tensor, inv_temperature: float, inplace: bool = False) -> torch.Tensor:
    """``z / temperature`` (fp32 or float64 ``z``; overwriting it with ``inplace``).  fp32:
    ``z * hi + z * lo`` with ``(hi, lo) = split_float(1 / t)`` (``z * fp32(1 / t)`` would bias
    every log-prob the same way; ``lo`` has ``hi``'s sign, so an infinite logit stays
    infinite); float64: ``z * (1 / t)``.  The torch paths' one temperature scaling."""
    if inv_temperature == 1.0:
        return z
    hi, lo = (inv_temperature, 0.0) if z.dtype == torch.float64 else split_float(inv_temperature)
    low = z * lo if lo else None
    z = z.mul_(hi) if inplace else z * hi
    return z if low is None else z.add_(low)


def _scaled(chunk: torch.Tensor, dtype: torch.dtype, inv_temperature: float) -> torch.Tensor:
    """``z = chunk / temperature`` in ``dtype``; the chunk itself (no copy) when that is it."""
    z = chunk.to(dtype)
    return divide_by_temperature(z, inv_temperature, inplace=z is not chunk)


def _ids(target_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[.., 1]`` gather indices; ids outside ``[0, V)`` (e.g. -100 labels at masked-out
    positions) are clamped instead of failing the gather, and :func:`_outside` marks them."""
    return target_ids.clamp(0, vocab - 1).unsqueeze(-1)


def _outside(target_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Ids outside ``[0, V)``: their log-prob is NaN and their gradient has no one-hot term,
    as on the GPU backends (which read nothing for them)."""
    return (target_ids < 0) | (target_ids >= vocab)


def logprobs_forward(logits, target_ids, inv_temperature, live=None, entropy=False):
    """``(logp, lse, ent)`` ``[B, T]`` (contract in ``backends/__init__.py``), chunk by chunk;
    ``ent`` None unless ``entropy``; 0 where ``live`` is False (those rows are still read).

    Per row: max ``m`` (0 where it is not finite), ``s = sum exp(z - m)``; ``logp = (z_target -
    m) - log s`` (a near-certain token keeps its precision), ``lse = m + log s`` in float64 (both
    parts exactly), ``ent = log s - sum exp(z - m) (z - m) / s`` (``-inf`` logits add 0)."""
    batch, length, vocab = logits.shape
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = logits.new_empty((batch, length), dtype=work)
    lse = logits.new_empty((batch, length), dtype=torch.float64)
    ent = torch.empty_like(logp) if entropy else None
    for rows, cols in _chunks(batch, length, vocab):
        z = _scaled(logits[rows, cols], work, inv_temperature)
        m = z.amax(-1, keepdim=True)
        shift = torch.where(torch.isfinite(m), m, 0)  # all -inf (or +inf, NaN) rows: no inf - inf
        d = z - shift
        e = torch.exp(d)
        s = e.sum(-1)
        log_s = s.log()
        shift = shift.squeeze(-1)
        lse[rows, cols] = shift.double() + log_s.double()
        ids = target_ids[rows, cols]
        picked = z.gather(-1, _ids(ids, vocab)).squeeze(-1).masked_fill_(_outside(ids, vocab), float("nan"))
        logp[rows, cols] = (picked - shift) - log_s
        if entropy:
            ent[rows, cols] = log_s - e.mul_(d.masked_fill_(e == 0, 0)).sum(-1) / s
    if live is not None:
        logp, lse = logp.masked_fill_(~live, 0), lse.masked_fill_(~live, 0)
        ent = None if ent is None else ent.masked_fill_(~live, 0)
    return logp, lse, ent


def _split(lse: torch.Tensor, work: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A saved logsumexp as ``(hi, lo)`` in ``work`` (``lo`` None when ``hi`` is exact): log p
    is then ``(z - hi) - lo``, exact for a near-certain token where ``z - fp32(lse)`` is not."""
    hi = lse.to(work)
    if lse.dtype == work:
        return hi, None
    return hi, torch.where(torch.isfinite(hi), lse - hi.to(lse.dtype), 0).to(work)


def logprobs_backward(grad_logp, logits, target_ids, lse, inv_temperature, inplace, grad_scale=None,
                      grad_entropy=None, entropy=None):
    """``d / d logits`` of ``grad_logp . logp + grad_entropy . ent`` (contract in
    ``backends/__init__.py``), chunk by chunk from the saved ``lse`` (and ``entropy``)."""
    batch, length, vocab = logits.shape
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    grad = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    lse_hi, lse_lo = _split(lse, work)
    if grad_scale is not None:
        grad_logp = grad_logp * grad_scale
        grad_entropy = None if grad_entropy is None else grad_entropy * grad_scale
    for rows, cols in _chunks(batch, length, vocab):
        scale = (grad_logp[rows, cols] * inv_temperature).unsqueeze(-1)
        z = _scaled(logits[rows, cols], work, inv_temperature)
        out = grad[rows, cols]
        # Work in the gradient's own storage where its dtype allows (fp32 logits, or in place
        # over them): no temporary of the chunk's size at all on the log-prob-only path.
        chunk = out if out.dtype == work and out.is_contiguous() else torch.empty_like(z)
        torch.sub(z, lse_hi[rows, cols].unsqueeze(-1), out=chunk)  # log p
        if lse_lo is not None:
            chunk.sub_(lse_lo[rows, cols].unsqueeze(-1))
        idle = scale == 0
        if grad_entropy is None:
            chunk.exp_().mul_(-scale)
        else:
            # -p * (scale + scale_h * (log p + H)), 0 where p == 0 (never 0 * -inf)
            scale_h = (grad_entropy[rows, cols] * inv_temperature).unsqueeze(-1)
            p = torch.exp(chunk)
            chunk.add_(entropy[rows, cols].unsqueeze(-1)).mul_(scale_h).add_(scale).mul_(p).neg_()
            chunk.masked_fill_(p == 0, 0)
            idle = idle & (scale_h == 0)
        ids = target_ids[rows, cols]
        chunk.scatter_add_(-1, _ids(ids, vocab), scale.masked_fill(_outside(ids, vocab).unsqueeze(-1), 0))
        chunk.masked_fill_(idle, 0)
        if chunk is not out:
            out.copy_(chunk)
    return grad


def epilogue(
    logp: torch.Tensor,
    old: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    groups: Optional[GroupLayout],
    ref: Optional[torch.Tensor],
    options: LensOptions,
    advantages: Optional[torch.Tensor] = None,
) -> EpilogueResult:
    """The reference epilogue in float64, differentiable in ``logp``; results in ``logp.dtype``."""
    double = lambda t: None if t is None else t.double()  # noqa: E731
    result = reference.epilogue(
        logp.double(), old.double(), mask, rewards.double(), groups, options, double(ref), double(advantages)
    )
    return EpilogueResult(*(None if t is None else t.to(logp.dtype) for t in result))
