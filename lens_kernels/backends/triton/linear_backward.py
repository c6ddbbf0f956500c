"""Fused-linear backward in Triton: ``dh``, ``dW`` and ``dbias`` from the saved logsumexp,
with the logits recomputed tile by tile and never held whole.

With ``z = (h @ W.T + b) / t``, ``log p = (z - m) - log s`` (the forward's two logsumexp
parts), ``g = d loss / d logp`` and ``g_H = d loss / d H`` per row,
``dZ = (g (onehot(target) - p) - g_H p (log p + H)) / t`` is the gradient of the loss with
respect to ``h @ W.T + b`` (the ``g_H`` term only with ``HAS_ENTROPY``: no entropy gradient,
no extra load or math); then ``dh = dZ @ W``, ``dW = dZ.T @ h`` and ``dbias = dZ.sum(0)``.

The vocabulary is walked in chunks of ``width`` columns (``width * N`` elements of scratch in
the inputs' dtype, at most ``SCRATCH_BYTES``).  Per chunk, three launches:

1. ``_dz_kernel`` (this file), grid over ``[BLOCK_N, BLOCK_V]`` tiles of the chunk: recomputes
   the logit tile (``linear_tile.logits_tile``), forms ``dZ`` in registers in fp32 and stores
   it rounded to the inputs' dtype (as PyTorch's own gradient of bf16 logits is);
   tiles whose rows all have ``g == 0`` and ``g_H == 0`` (masked positions, zero-advantage
   rows, clipped tokens) skip the GEMM and store zeros; with a bias, ``dbias[chunk] = dZ.sum(0)`` (fp32 sums of the
   stored ``dZ``, as the one-pass path and PyTorch's own bf16 backward sum);
2. ``linear_grad_gemm.accumulate_dh``: ``dh_acc (fp32) += dZ @ W[chunk]``;
3. ``linear_grad_gemm.write_dw``: ``dW[chunk] = dZ.T @ h`` reduced over all ``N`` in fp32 and
   written once.

GEMMs: one in the forward, three here (four in all, ``8 N V d`` FLOPs with every row live).
No atomics, no locks: every output element has one writer per launch and launches run in a
fixed order, so results are bitwise reproducible for a given choice of tiles (autotuned once
per machine, ``linear_tile.autotuned``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...config import split_float
from .linear_grad_gemm import accumulate_dh, live_row_blocks, write_dw
from .linear_tile import autotuned, grouped, logits_tile, rounded, tiles_for

# Bound on the dZ scratch of one vocabulary chunk.
SCRATCH_BYTES = 512 * 2**20


@autotuned("logits", "h_ptr", key=["D"])
@triton.jit
def _dz_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, g_ptr, gh_ptr, ent_ptr, lse_ptr, dz_ptr,
    N, V, D, col0, width,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_dz,
    inv_t_hi, inv_t_lo,
    HAS_BIAS: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    tile_v, tile_n = grouped(tl.program_id(0), tl.cdiv(width, BLOCK_V), tl.cdiv(N, BLOCK_N), GROUP)
    rows = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    local = tile_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = local < width
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    active = g != 0
    if HAS_ENTROPY:
        gh = tl.load(gh_ptr + rows, mask=row_ok, other=0.0)
        active = active | (gh != 0)
    dz = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if tl.sum(active.to(tl.int32), axis=0) > 0:
        cols = col0 + local
        z = logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok & (cols < V), D,
            stride_hn, stride_hd, stride_wv, stride_wd, inv_t_hi, inv_t_lo,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION, UPCAST,
        )
        top = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
        log_total = tl.load(lse_ptr + N + rows, mask=row_ok, other=0.0)
        log_p = (z - top[:, None]) - log_total[:, None]
        p = tl.exp(log_p)
        target = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
        onehot = tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
        inv_t = inv_t_hi + inv_t_lo  # the nearest fp32 of 1 / t (the split's hi alone is not)
        grad = (g * inv_t)[:, None] * (onehot - p)
        if HAS_ENTROPY:  # d H / d z_v = -p_v (log p_v + H); 0 where p_v = 0 (a -inf logit)
            ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
            grad -= (gh * inv_t)[:, None] * tl.where(p > 0, p * (log_p + ent[:, None]), 0.0)
        # Rows with no gradient stay exactly 0, even where their logits are not finite.
        dz = tl.where(active[:, None], grad, 0.0)
    out = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + local[None, :]
    tl.store(out, rounded(dz, dz_ptr.dtype.element_ty, UPCAST), mask=row_ok[:, None] & col_ok[None, :])


def chunk_width(rows: int, vocab: int, element_size: int, align: int) -> int:
    """Columns per vocabulary chunk: a multiple of ``align``, at most ``SCRATCH_BYTES`` of
    ``[rows, width]`` scratch, at least ``align``, at most the whole (rounded-up) vocabulary."""
    fit = SCRATCH_BYTES // max(1, rows * element_size) // align * align
    return max(align, min(fit, triton.cdiv(vocab, align) * align))


def linear_logprobs_backward(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target_ids: torch.Tensor,
    lse: torch.Tensor,
    inv_temperature: float,
    grad_entropy: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(dh [N, d], dW [V, d], dbias [V] or None)`` in the inputs' dtypes, all contiguous.

    ``grad_logp [N]`` fp32 contiguous, ``lse [2, N]`` fp32 from :func:`linear_logprobs_forward`,
    the other arguments as given to it; ``grad_entropy [N]`` fp32 contiguous with the forward's
    ``entropy [N]``, or None (the log-prob-only kernel: no entropy load or math).
    """
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    tiles = tiles_for(hidden.dtype, device)
    with_entropy = grad_entropy is not None
    # rows with a gradient, for the GEMMs' skipping (they only test it against 0)
    active = ((grad_logp != 0) | (grad_entropy != 0)).to(torch.float32) if with_entropy else grad_logp
    acc = torch.zeros((rows, dim), device=device, dtype=torch.float32)
    dw = torch.empty((vocab, dim), device=device, dtype=weight.dtype)
    dbias = None if bias is None else torch.empty(vocab, device=device, dtype=bias.dtype)
    width = chunk_width(rows, vocab, hidden.element_size(), tiles.chunk_align)
    dz = torch.empty((rows, width), device=device, dtype=hidden.dtype)
    order, count = live_row_blocks(active, tiles.dw_rows)
    live = order[0], count
    inv_t = split_float(inv_temperature)
    for col0 in range(0, vocab, width):
        cols = min(width, vocab - col0)
        if rows:
            _dz_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_N"]) * triton.cdiv(cols, meta["BLOCK_V"]),)](
                hidden, weight, weight if bias is None else bias, target_ids, grad_logp,
                grad_entropy if with_entropy else grad_logp, entropy if with_entropy else grad_logp, lse, dz,
                rows, vocab, dim, col0, cols,
                *hidden.stride(), *weight.stride(), dz.stride(0),
                *inv_t,
                HAS_BIAS=bias is not None, HAS_ENTROPY=with_entropy,
                GROUP=tiles.group, PRECISION=tiles.precision, UPCAST=tiles.upcast,
            )
            accumulate_dh(dz, weight, active, acc, col0, cols, tiles)
        write_dw(dz, hidden, active, live, dw[col0:col0 + cols], cols, tiles)
        if dbias is not None:
            dbias[col0:col0 + cols] = dz[:, :cols].sum(0, dtype=torch.float32)
    return acc.to(hidden.dtype), dw, dbias
