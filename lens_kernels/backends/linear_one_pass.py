"""Fused-linear loss in one pass on a GPU backend (triton, cuda): three GEMMs, the gradient
made during the forward.

When every token's coefficient is known before the vocabulary pass (old log-probs given,
``mode="grpo"`` or caller-given advantages; ``kernel_loss.one_pass_applies``), the loss of a
row needs only that row's logits, so the rows are processed ``n`` at a time (``n`` chosen so
that one ``[n, V]`` block of logits fits in ``SCRATCH_BYTES``):

1. ``Z = h[rows] @ W.T + b`` into the block (fp32 accumulation, rounded to the inputs' dtype
   as PyTorch's own logits are);
2. the backend's one-pass loss kernel (``fused_loss``, as for logits) on the block, seen as
   ``[n, 1, V]`` (``n`` rows of one position; the per-row advantages and weights gathered to
   per-token ``[N]`` once per call): online logsumexp, log-prob, surrogate, loss terms, and
   ``d loss / d Z`` written over the block in place;
3. ``dh[rows] = dZ @ W`` and ``dW (+)= dZ.T @ h[rows]``; ``dbias += dZ.sum(0)`` in fp32.

Three GEMMs (``6 N V d`` FLOPs) instead of the four of the recompute path (forward GEMM, then
logits recomputed in the backward), and the backward only scales the three gradients by
``grad_output``.  GEMMs whose gradient nobody needs (a frozen ``lm_head``: no ``dW``) are not
run.  Two sets of GEMMs (``gemm``):

* ``"library"`` (``linear_blocks.LibraryBlockGemms``): ``torch.mm``, i.e. cuBLAS, over every
  row; masked-out rows of ``hidden`` are replaced by zeros first (they may hold NaN; their
  ``dZ`` row is 0 and ``0 * NaN`` would reach ``dW``);
* ``"triton"`` (``triton.linear_block_gemm.TritonBlockGemms``): Triton GEMMs that skip, on
  the device, the row tiles with no completion token (logits) and with no nonzero
  coefficient (``dh``, ``dW``): padding and zero-advantage groups cost no FLOPs, at the
  Triton tiles' speed instead of the library's.  The rows are first put in the order
  "may have a gradient, other completion tokens, the rest" by a stable device sort (the
  hidden states and per-token inputs gathered once, ``O(N d)``), so that row tiles are all
  work or all skipped; log-probs, loss terms and ``dh`` go back to the callers' order.

``dW`` is accumulated across row blocks in the weight's dtype (each block's GEMM sums in
fp32 and rounds once): an fp32 ``[V, d]`` accumulator would cost ``4 V d`` bytes (1.2 GB at
V=151936, d=2048), more than the whole path's memory budget.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..config import LensOptions
from ..groups import GroupLayout
from . import get
from .common import calibrate, finalize
from .common.calibrate import WEIGHT_ROW
from .kernel_loss import KernelLoss
from .linear_blocks import LibraryBlockGemms, blocks


class LinearGrads(NamedTuple):
    """Gradients of the loss (``None`` where not requested), in the inputs' dtypes."""

    hidden: Optional[torch.Tensor]  # [N, d]
    weight: Optional[torch.Tensor]  # [V, d]
    bias: Optional[torch.Tensor]  # [V]


def _per_token(tensor: Optional[torch.Tensor], rows: int) -> Optional[torch.Tensor]:
    """A ``[B, T]`` input as ``[N, 1]`` (a view where the layout allows)."""
    return None if tensor is None else tensor.reshape(rows, 1)


def _block_gemms(gemm: str, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 live: torch.Tensor, may_have_grad: Optional[torch.Tensor], span: int):
    """The GEMMs of the blocks of ``span`` rows of ``hidden [N, d]``; ``live``, ``may_have_grad``
    ``[N]`` bool (the latter for the Triton GEMMs only)."""
    if gemm == "library":
        return LibraryBlockGemms(hidden, weight, bias, live)
    from .triton.linear_block_gemm import TritonBlockGemms

    return TritonBlockGemms(hidden, weight, bias, live, may_have_grad.to(torch.float32), span)


def _work_first(live: torch.Tensor, may_have_grad: torch.Tensor) -> torch.Tensor:
    """A permutation of the rows (int64 ``[N]``, stable): rows that may have a gradient first,
    then the other live rows, then the rest, so that the Triton GEMMs' row tiles are all work
    or all skipped (a device sort: no host sync)."""
    key = 2 - live.to(torch.int8) - may_have_grad.to(torch.int8)
    return torch.argsort(key, stable=True)


def linear_one_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target_ids: torch.Tensor,
    live: torch.Tensor,
    rewards: torch.Tensor,
    old: Optional[torch.Tensor],
    ref: Optional[torch.Tensor],
    advantages: Optional[torch.Tensor],
    groups: Optional[GroupLayout],
    options: LensOptions,
    needs: tuple[bool, bool, bool],
    gemm: str = "library",
) -> tuple[KernelLoss, LinearGrads]:
    """The loss of the logits ``hidden [N, d] @ weight.T + bias``, ``N = B * T`` rows in the
    order of ``target_ids [B, T]``, with the gradients ``needs = (dh, dW, dbias)`` made on the way.

    ``live [B, T]`` bool; ``old``/``ref [B, T]``; ``advantages [B]`` or None; ``weight [V, d]``
    and ``bias [V]`` of hidden's dtype (fp32, bf16, fp16); ``options.backend`` triton or cuda.
    ``gemm``: ``"library"`` (``linear_blocks.LibraryBlockGemms``: cuBLAS over every row) or
    ``"triton"`` (``triton.linear_block_gemm.TritonBlockGemms``: rows that need no work
    skipped, after a device sort that puts them last; backend triton).  Nothing syncs with
    the host.
    """
    rows, dim = hidden.shape
    batch, length = live.shape
    vocab = weight.shape[0]
    need_h, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    write_grad = need_h or need_w or need_b
    cal = calibrate(old, live, rewards, groups, options, advantages)
    # per-token views of the [B, T] inputs and gathers of the [B] ones: block rows are [n, 1] problems
    row_of = torch.arange(rows, device=hidden.device) // max(length, 1)
    token_adv, token_weight = cal.advantages[row_of], cal.scratch[WEIGHT_ROW][row_of]
    token_ids, token_live = _per_token(target_ids, rows), _per_token(live, rows)
    token_old, token_ref = _per_token(old, rows), _per_token(ref, rows)
    flat_live, may_have_grad, order = live.reshape(rows), None, None
    if gemm == "triton":  # the Triton GEMMs skip whole row tiles: rows taken in the order of _work_first
        with_kl = ref is not None and options.beta > 0  # a KL term: every live row may have a gradient
        may_have_grad = flat_live if with_kl else flat_live & (token_adv * token_weight != 0)
        order = _work_first(flat_live, may_have_grad)
        hidden, flat_live, may_have_grad, token_adv, token_weight, token_ids, token_live, token_old, token_ref = (
            None if t is None else t[order] for t in (hidden, flat_live, may_have_grad, token_adv, token_weight,
                                                      token_ids, token_live, token_old, token_ref))
    logp = torch.empty(rows, device=hidden.device, dtype=torch.float32)
    parts = torch.empty((3, rows), device=hidden.device, dtype=torch.float64)
    dh = torch.empty((rows, dim), device=hidden.device, dtype=hidden.dtype) if need_h else None
    dw = (torch.empty if rows else torch.zeros)(weight.shape, device=weight.device, dtype=weight.dtype) \
        if need_w else None
    db = torch.zeros(vocab, device=hidden.device, dtype=torch.float32) if need_b else None
    fused_loss = get(options.backend).fused_loss
    buffer, spans = blocks(hidden, vocab)
    gemms = _block_gemms(gemm, hidden, weight, bias, flat_live, may_have_grad, buffer.shape[0])
    for r in spans:
        z = buffer[: r.stop - r.start]
        gemms.logits(z, r)
        block_logp, block_parts = fused_loss(
            z[:, None], token_ids[r], token_live[r], None if old is None else token_old[r],
            None if ref is None else token_ref[r], token_adv[r], token_weight[r], z[:, None] if write_grad else None,
            options,
        )
        logp[r] = block_logp[:, 0]
        parts[:, r] = block_parts
        gemms.grads(z, r, dh, dw, db)
    if order is not None:  # back to the callers' row order
        logp, parts = logp.scatter(0, order, logp), parts.scatter(1, order.expand(3, rows), parts)
        dh = None if dh is None else dh.index_copy(0, order, dh)
    logp = logp.view(batch, length)
    if old is None and advantages is None:  # grpo on-policy: confidences from this pass
        calibrate(logp, live, rewards, groups, options, into=cal)
    loss, clip, kl = finalize(parts, cal.totals, ref is not None)
    grads = LinearGrads(dh, dw, None if db is None else db.to(bias.dtype))
    return KernelLoss(loss, logp, cal.outputs, clip, kl), grads
