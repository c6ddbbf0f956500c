"""Fused-linear vocabulary pass on row blocks, for the GPU backends (triton, cuda): the logits
of ``n`` rows at a time by a library GEMM (``torch.mm``: cuBLAS on CUDA) into one bounded
buffer, the per-row work by the backend's own row kernels (``logprobs_forward`` /
``logprobs_backward`` of the contract in ``backends/__init__.py``).

The alternative to the Triton logit tiles (``triton/linear_forward``, ``triton/linear_backward``):
the GEMMs run at the library's speed, at the price of writing each block of logits once and
reading it back (``2 n V`` elements of traffic per block, ~3 ms per pass at N=16384,
V=151936 on an H100).  A block of rows is handed to the row kernels as ``[n, 1, V]`` (``n``
rows of one position), so they need no notion of an offset.

* forward: ``Z = h[block] @ W.T + b`` into the buffer, then ``logprobs_forward`` on it:
  ``(logp, lse)`` per row, the block never kept;
* backward: the block recomputed (rows with ``g == 0`` zeroed first: their hidden states may
  be NaN and must not reach ``dW``), ``logprobs_backward`` overwrites it with ``dZ`` in place,
  then ``dh[block] = dZ @ W``, ``dW (+)= dZ.T @ h[block]`` and ``dbias += dZ.sum(0)`` (fp32).

``blocks``, ``logits_into`` and ``add_weight_grads`` are shared with the one-pass loss
(``linear_one_pass``), which runs its GEMMs through ``LibraryBlockGemms``.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from . import get

# Bound on the block of logits (and, in place, their gradient) of one group of rows.
SCRATCH_BYTES = 512 * 2**20
# Rows per block are rounded down to a multiple of this (GEMM-friendly), when there are more.
ROW_ALIGN = 128


def block_rows(rows: int, vocab: int, element_size: int) -> int:
    """Rows per block: ``[n, V]`` logits within ``SCRATCH_BYTES``, a multiple of ``ROW_ALIGN``
    where that leaves at least one, at least 1 and at most ``rows``."""
    fit = SCRATCH_BYTES // max(1, vocab * element_size)
    if fit >= ROW_ALIGN:
        fit = fit // ROW_ALIGN * ROW_ALIGN
    return max(1, min(rows, fit))


def blocks(hidden: torch.Tensor, vocab: int) -> tuple[torch.Tensor, Iterator[slice]]:
    """The ``[n, V]`` buffer for ``hidden [N, d]`` and the row slices of its blocks."""
    rows = hidden.shape[0]
    step = block_rows(rows, vocab, hidden.element_size())
    buffer = torch.empty((step, vocab), device=hidden.device, dtype=hidden.dtype)
    return buffer, (slice(r, min(rows, r + step)) for r in range(0, rows, step))


def logits_into(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """``out [n, V] = h [n, d] @ weight.T + bias`` (fp32 accumulation, rounded to out's dtype)."""
    if bias is None:
        torch.mm(h, weight.T, out=out)
    else:
        torch.addmm(bias, h, weight.T, out=out)


def add_weight_grads(dz: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rows: slice,
                     dh: Optional[torch.Tensor], dw: Optional[torch.Tensor], db: Optional[torch.Tensor]) -> None:
    """One block's share of the gradients from its ``dZ [n, V]``: ``dh[rows] = dZ @ W``,
    ``dW (+)= dZ.T @ h`` (written by the first block, accumulated after), ``db += dZ.sum(0)``."""
    if dh is not None:
        torch.mm(dz, weight, out=dh[rows])
    if dw is not None:
        if rows.start == 0:
            torch.mm(dz.T, h, out=dw)
        else:
            dw.addmm_(dz.T, h)
    if db is not None:
        db += dz.sum(0, dtype=torch.float32)


class LibraryBlockGemms:
    """The GEMMs of ``linear_one_pass`` by ``torch.mm`` (cuBLAS) over every row of a block;
    rows not ``live [N]`` have their hidden states replaced by zeros first (they may hold NaN,
    and ``0 * NaN`` would reach ``dW``).  ``backends.triton.linear_block_gemm`` has the same
    two methods with Triton kernels that skip rows."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], live: torch.Tensor):
        self.hidden, self.weight, self.bias, self.live = hidden, weight, bias, live
        self._h: Optional[torch.Tensor] = None

    def logits(self, z: torch.Tensor, rows: slice) -> None:
        self._h = torch.where(self.live[rows, None], self.hidden[rows], 0)
        logits_into(z, self._h, self.weight, self.bias)

    def grads(self, dz: torch.Tensor, rows: slice, dh: Optional[torch.Tensor], dw: Optional[torch.Tensor],
              db: Optional[torch.Tensor]) -> None:
        add_weight_grads(dz, self._h, self.weight, rows, dh, dw, db)


def linear_logprobs_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target_ids: torch.Tensor,
    inv_temperature: float, backend: str, live: Optional[torch.Tensor] = None, entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(logp [N], lse [2, N], ent [N] or None)`` fp32 (``lse`` as two parts whose sum is the
    logsumexp, the fused-linear op's contract, ``linear_ops``: here the fp32 rounding of the
    row kernels' float64 logsumexp and its remainder; ``ent`` with ``entropy``, from
    the same sweep of each row) of ``hidden [N, d]``, ``weight [V, d]``, ``bias`` and
    ``target_ids [N]`` (ids outside ``[0, V)`` give NaN) through ``backend``'s row kernels;
    0 at rows where ``live [N]`` (bool, optional) is False (the library GEMM still makes their
    logits: skipping them would need their count on the host)."""
    rows = hidden.shape[0]
    vocab = weight.shape[0]
    logp = torch.empty(rows, device=hidden.device, dtype=torch.float32)
    lse = torch.zeros((2, rows), device=hidden.device, dtype=torch.float32)
    ent = torch.empty_like(logp) if entropy else None
    kernels = get(backend)
    buffer, spans = blocks(hidden, vocab)
    for r in spans:
        z = buffer[: r.stop - r.start]
        logits_into(z, hidden[r], weight, bias)
        block_logp, block_lse, block_ent = kernels.logprobs_forward(z[:, None], target_ids[r, None], inv_temperature,
                                                                    entropy=entropy)
        logp[r], lse[0, r] = block_logp[:, 0], block_lse[:, 0]
        lse[1, r] = block_lse[:, 0] - lse[0, r].to(block_lse.dtype)
        if entropy:
            ent[r] = block_ent[:, 0]
    if live is not None:
        logp, lse = torch.where(live, logp, 0), torch.where(live, lse, 0)
        ent = None if ent is None else torch.where(live, ent, 0)
    return logp, lse, ent


def linear_logprobs_backward(
    grad_logp: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    target_ids: torch.Tensor, lse: torch.Tensor, inv_temperature: float, backend: str,
    grad_entropy: Optional[torch.Tensor] = None, entropy: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(dh [N, d], dW [V, d], dbias [V] or None)`` in the inputs' dtypes from ``grad_logp [N]``,
    the forward's ``lse [2, N]`` and, when given, ``grad_entropy [N]`` with the forward's
    ``entropy [N]`` (all fp32); rows whose gradients are all 0 add nothing."""
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    dh = torch.empty((rows, dim), device=hidden.device, dtype=hidden.dtype)
    dw = (torch.empty if rows else torch.zeros)(weight.shape, device=weight.device, dtype=weight.dtype)
    db = None if bias is None else torch.zeros(vocab, device=hidden.device, dtype=torch.float32)
    kernels = get(backend)
    lse = lse[0].double() + lse[1].double()  # the row kernels split it again into fp32 parts
    active = grad_logp != 0
    if grad_entropy is not None:
        active |= grad_entropy != 0
    buffer, spans = blocks(hidden, vocab)
    for r in spans:
        z = buffer[: r.stop - r.start]
        h = torch.where(active[r, None], hidden[r], 0)
        logits_into(z, h, weight, bias)
        with_entropy = {} if grad_entropy is None else dict(grad_entropy=grad_entropy[r, None], entropy=entropy[r, None])
        kernels.logprobs_backward(grad_logp[r, None], z[:, None], target_ids[r, None], lse[r, None], inv_temperature,
                                  True, **with_entropy)
        add_weight_grads(z, h, weight, r, dh, dw, db)
    return dh, dw, None if db is None else db.to(bias.dtype)
