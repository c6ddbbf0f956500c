"""Mechanism metrics of the paper's claims, measured during training.

``negative_group_grad_share`` answers "do negative groups carry gradient?": the loss of a
minibatch is a sum of per-row terms, so its gradient splits exactly into the part from rows of
negative groups (every reward 0) and the part from the other groups.  The negative part is
computed with ``torch.autograd.grad`` (leaving ``.grad`` and every RNG untouched, so the training
trajectory is the same with or without the measurement), the rest is the accumulated
minibatch gradient minus it.  Under ``mode="grpo"`` (and ``"lens-mixed-only"``) the advantages
of negative groups are exactly 0, so their share is exactly 0.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def grad_share(neg_sq: float, total_sq: float, dot: float) -> dict[str, float]:
    """Norms of g_neg and g_rest = g_total - g_neg from ||g_neg||^2, ||g_total||^2 and
    <g_neg, g_total>; the share is ||g_neg|| / (||g_neg|| + ||g_rest||) (0 when both are 0)."""
    if neg_sq < 0 or total_sq < 0:
        raise ValueError(f"grad_share: squared norms must be >= 0, got {neg_sq}, {total_sq}")
    neg = neg_sq ** 0.5
    rest = max(total_sq - 2.0 * dot + neg_sq, 0.0) ** 0.5
    share = neg / (neg + rest) if neg + rest > 0 else 0.0
    return {"grad_share_negative_groups": share, "grad_norm_negative_groups": neg,
            "grad_norm_other_groups": rest}


def negative_group_grad_share(
    params: Sequence[torch.Tensor],
    negative_rows: torch.Tensor,
    micro_rows: int,
    row_loss: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, float]:
    """Split the gradient already accumulated in ``params[i].grad`` (one minibatch, before
    clipping) into its negative-group and other-group parts.

    ``negative_rows``: the minibatch's rows that belong to negative groups (whole groups);
    ``row_loss(rows)``: those rows' contribution to the minibatch loss (already weighted by
    their share of the aggregation), a differentiable scalar; evaluated ``micro_rows`` rows
    (a multiple of G) at a time.
    """
    if micro_rows < 1:
        raise ValueError(f"micro_rows: expected >= 1, got {micro_rows}")
    params = [p for p in params if p.grad is not None]
    total_sq = float(sum((p.grad.float() ** 2).sum() for p in params)) if params else 0.0
    if len(negative_rows) == 0 or not params:
        return grad_share(0.0, total_sq, 0.0)
    g_neg = [torch.zeros_like(p) for p in params]
    for m in range(0, len(negative_rows), micro_rows):
        loss = row_loss(negative_rows[m : m + micro_rows])
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, g in zip(g_neg, grads):
                if g is not None:
                    acc += g
    neg_sq = float(sum((g.float() ** 2).sum() for g in g_neg))
    dot = float(sum((g.float() * p.grad.float()).sum() for g, p in zip(g_neg, params)))
    return grad_share(neg_sq, total_sq, dot)
