"""Fused-linear forward in Triton: token log-probs from ``hidden`` and the output weight,
without the ``[N, V]`` logits.

Two kernels:

1. ``_partials_kernel``, grid ``cdiv(N, BLOCK_N) * splits`` where a split is
   ``Tiles.split_cols`` consecutive vocabulary columns (tiles of ``BLOCK_V``; the tile shapes,
   warps and stages are autotuned, ``linear_tile.CONFIGS``).  A program computes
   its logit tiles (``linear_tile.logits_tile``: a ``tl.dot`` loop over ``d``, fp32
   accumulation), keeps an online max ``m`` and rescaled sum-exp ``s`` per row (with the
   entropy, also ``u = sum exp(z - m) (z - m)``, rescaled alike: a ``HAS_ENTROPY`` switch),
   and picks the target logit out of the tile that holds it (0 elsewhere).  It writes one
   partial ``(m, s, z_target[, u])`` per (split, row): ``3 * splits * N`` fp32 values in all
   (4 with the entropy).  Given the rows' ``live`` flags (the loss path: the completion
   mask), a tile of rows none of which is live skips its GEMM (padding and prompt positions
   cost no FLOPs).
2. ``_merge_kernel``, grid ``cdiv(N, BLOCK)``: for each row, walks the splits in order,
   ``S = sum_k s_k exp(m_k - M)`` with ``M = max_k m_k``, ``lse = M + log S`` (kept as the two
   parts ``(M, log S)``: the backward's ``log p = (z - M) - log S`` stays exact for a
   near-certain token at large ``|z|``), ``logp = (z_target - M) - log S`` with the target
   logit read from the split ``target // split_cols`` only, and the entropy
   ``log S - U / S`` with ``U = sum_k exp(m_k - M) (u_k + (m_k - M) s_k)``.  A fixed order, no
   atomics: bitwise deterministic.  Rows that are not live get 0 everywhere.

Ids outside ``[0, V)`` (a -100 label at a masked position) give ``logp = NaN`` and touch no
memory out of range, as in the logits path.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...config import split_float
from .linear_tile import Tiles, autotuned, grouped, logits_tile, tiles_for

_MERGE_BLOCK = 256


@autotuned("logits", "h_ptr", key=["D"])
@triton.jit
def _partials_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, live_ptr, m_ptr, s_ptr, zt_ptr, u_ptr,
    N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    inv_t_hi, inv_t_lo, splits,
    SPLIT_COLS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LIVE: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    tl.static_assert(SPLIT_COLS % BLOCK_V == 0, "a split must be whole tiles")
    tiles_per_split: tl.constexpr = SPLIT_COLS // BLOCK_V
    split, tile_n = grouped(tl.program_id(0), splits, tl.cdiv(N, BLOCK_N), GROUP)
    rows = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    target = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    u = tl.zeros((BLOCK_N,), tl.float32)
    z_target = tl.zeros((BLOCK_N,), tl.float32)
    if HAS_LIVE:
        walk = tl.where(tl.max(tl.load(live_ptr + rows, mask=row_ok, other=0).to(tl.int32), axis=0) > 0,
                        tiles_per_split, 0)
    else:
        walk = tiles_per_split
    for tile in range(0, walk):
        cols = split * SPLIT_COLS + tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D,
            stride_hn, stride_hd, stride_wv, stride_wd, inv_t_hi, inv_t_lo,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION, UPCAST,
        )
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # A tile of only -inf (past V) with nothing finite before it must not give -inf - -inf.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m - shift)
        centred = z - shift[:, None]
        e = tl.exp(centred)
        if HAS_ENTROPY:  # u = sum exp(z - m) (z - m), moved to the new max: exp(m - m') (u + (m - m') s)
            u = rescale * (u + tl.where(s > 0, (m - shift) * s, 0.0)) + \
                tl.sum(tl.where(e > 0, e * centred, 0.0), axis=1)
        s = s * rescale + tl.sum(e, axis=1)
        m = m_new
        z_target += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
    out = split.to(tl.int64) * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(zt_ptr + out, z_target, mask=row_ok)
    if HAS_ENTROPY:
        tl.store(u_ptr + out, u, mask=row_ok)


@triton.jit
def _merge_kernel(
    m_ptr, s_ptr, zt_ptr, u_ptr, tgt_ptr, live_ptr, logp_ptr, lse_ptr, ent_ptr,
    N, V, splits, split_cols,
    HAS_LIVE: tl.constexpr, HAS_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = rows < N
    row_ok = inside  # the rows computed; the others get 0
    if HAS_LIVE:
        row_ok = inside & (tl.load(live_ptr + rows, mask=inside, other=0) != 0)
    top = tl.full((BLOCK,), float("-inf"), tl.float32)
    for k in range(0, splits):
        top = tl.maximum(top, tl.load(m_ptr + k * N + rows, mask=row_ok, other=float("-inf")))
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros((BLOCK,), tl.float32)
    spread = tl.zeros((BLOCK,), tl.float32)
    for k in range(0, splits):
        m = tl.load(m_ptr + k * N + rows, mask=row_ok, other=float("-inf"))
        s = tl.load(s_ptr + k * N + rows, mask=row_ok, other=0.0)
        rescale = tl.exp(m - shift)
        total += s * rescale
        if HAS_ENTROPY:
            u = tl.load(u_ptr + k * N + rows, mask=row_ok, other=0.0)
            spread += rescale * (u + tl.where(s > 0, (m - shift) * s, 0.0))
    log_total = tl.where(row_ok, tl.log(tl.where(row_ok, total, 1.0)), 0.0)
    target = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    valid = (target >= 0) & (target < V) & row_ok
    owner = tl.where(valid, target // split_cols, 0)
    z_target = tl.load(zt_ptr + owner * N + rows, mask=valid, other=float("nan"))
    # log p = (z - m) - log s: exact for a near-certain token, where z - fp32(m + log s) is not
    tl.store(logp_ptr + rows, tl.where(row_ok, (z_target - top) - log_total, 0.0), mask=inside)
    tl.store(lse_ptr + rows, tl.where(row_ok, top, 0.0), mask=inside)
    tl.store(lse_ptr + N + rows, log_total, mask=inside)
    if HAS_ENTROPY:
        tl.store(ent_ptr + rows, tl.where(row_ok, log_total - spread / tl.where(row_ok, total, 1.0), 0.0),
                 mask=inside)


def partials(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target_ids: torch.Tensor,
    live: Optional[torch.Tensor], inv_temperature: float, tiles: Tiles, entropy: bool = False,
) -> torch.Tensor:
    """``[3 or 4, splits, N]`` fp32: the per-split running max, rescaled sum-exp, target logit
    and (``entropy``) rescaled ``sum exp(z - m) (z - m)`` of every row (``-inf``, 0, 0, 0
    where a row tile was skipped).  Arguments as for :func:`linear_logprobs_forward`, ``N > 0``."""
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    splits = triton.cdiv(vocab, tiles.split_cols)
    parts = torch.empty((4 if entropy else 3, splits, rows), device=hidden.device, dtype=torch.float32)
    _partials_kernel[lambda meta: (splits * triton.cdiv(rows, meta["BLOCK_N"]),)](
        hidden, weight, weight if bias is None else bias, target_ids, target_ids if live is None else live,
        *parts[:3], parts[-1],  # u: the last plane (z_target's, unused, without the entropy)
        rows, vocab, dim,
        *hidden.stride(), *weight.stride(),
        *split_float(inv_temperature), splits,
        SPLIT_COLS=tiles.split_cols, HAS_BIAS=bias is not None, HAS_LIVE=live is not None, HAS_ENTROPY=entropy,
        GROUP=tiles.group, PRECISION=tiles.precision, UPCAST=tiles.upcast,
    )
    return parts


def linear_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target_ids: torch.Tensor,
    inv_temperature: float,
    live: Optional[torch.Tensor] = None,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(logp [N], lse [2, N], ent [N] or None)`` fp32 for
    ``z = (hidden @ weight.T + bias) / t`` (``inv_temperature = 1 / t``): ``lse`` as its two
    parts, the row max and the log of the sum of exponentials from it, ``ent`` the entropy
    of ``softmax(z)`` (with ``entropy``, from the same partials).

    ``hidden [N, d]`` and ``weight [V, d]`` (same dtype: fp32, bf16 or fp16; any strides),
    ``bias [V]`` or None, ``target_ids [N]`` int64 contiguous, ``live [N]`` bool contiguous or
    None (every row live): rows not live get 0, and a row tile with no live row is skipped.
    """
    rows = hidden.shape[0]
    logp = torch.empty(rows, device=hidden.device, dtype=torch.float32)
    lse = torch.empty((2, rows), device=hidden.device, dtype=torch.float32)
    ent = torch.empty_like(logp) if entropy else None
    if rows == 0:
        return logp, lse, ent
    tiles = tiles_for(hidden.dtype, hidden.device)
    parts = partials(hidden, weight, bias, target_ids, live, inv_temperature, tiles, entropy)
    _merge_kernel[(triton.cdiv(rows, _MERGE_BLOCK),)](
        *parts[:3], parts[-1], target_ids, target_ids if live is None else live, logp, lse, logp if ent is None else ent,
        rows, weight.shape[0], parts.shape[1], tiles.split_cols,
        HAS_LIVE=live is not None, HAS_ENTROPY=entropy, BLOCK=_MERGE_BLOCK,
    )
    return logp, lse, ent
