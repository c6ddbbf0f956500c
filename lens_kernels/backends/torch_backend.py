"""Torch backend: the vocabulary pass in row chunks, the epilogue from ``reference``.

Works on any device.  The forward keeps ``[B, T]`` fp32 log-probs and logsumexps; the
backward recomputes the softmax chunk by chunk from the saved logsumexp.  Temporaries are
bounded by ``CHUNK_BYTES`` whatever the problem size.  The epilogue runs
:func:`lens_kernels.reference.epilogue` in float64 and takes ``d loss / d logp`` from autograd,
so its formulas are the reference's own.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from .. import reference
from ..config import EpilogueResult, LensOptions
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


def _scaled(chunk: torch.Tensor, dtype: torch.dtype, inv_temperature: float) -> torch.Tensor:
    """``chunk * inv_temperature`` in ``dtype``; the chunk itself (no copy) when that is it."""
    chunk = chunk.to(dtype)
    return chunk if inv_temperature == 1.0 else chunk * inv_temperature


def _ids(target_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[.., 1]`` gather indices; ids outside ``[0, V)`` (e.g. -100 labels at masked-out
    positions, whose values nothing reads) are clamped instead of failing the gather."""
    return target_ids.clamp(0, vocab - 1).unsqueeze(-1)


def logprobs_forward(logits, target_ids, inv_temperature):
    batch, length, vocab = logits.shape
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = logits.new_empty((batch, length), dtype=work)
    lse = torch.empty_like(logp)
    for rows, cols in _chunks(batch, length, vocab):
        z = _scaled(logits[rows, cols], work, inv_temperature)
        lse[rows, cols] = torch.logsumexp(z, -1)
        logp[rows, cols] = z.gather(-1, _ids(target_ids[rows, cols], vocab)).squeeze(-1) - lse[rows, cols]
    return logp, lse


def logprobs_backward(grad_logp, logits, target_ids, lse, inv_temperature, inplace, grad_scale=None):
    batch, length, vocab = logits.shape
    grad = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if grad_scale is not None:
        grad_logp = grad_logp * grad_scale
    for rows, cols in _chunks(batch, length, vocab):
        scale = (grad_logp[rows, cols] * inv_temperature).unsqueeze(-1)
        z = _scaled(logits[rows, cols], lse.dtype, inv_temperature)
        out = grad[rows, cols]
        # Work in the gradient's own storage where its dtype allows (fp32 logits, or in place
        # over them): no temporary of the chunk's size at all.
        chunk = out if out.dtype == lse.dtype and out.is_contiguous() else torch.empty_like(z)
        torch.sub(z, lse[rows, cols].unsqueeze(-1), out=chunk)
        chunk.exp_().mul_(-scale)
        chunk.scatter_add_(-1, _ids(target_ids[rows, cols], vocab), scale)
        chunk.masked_fill_(scale == 0, 0)
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
