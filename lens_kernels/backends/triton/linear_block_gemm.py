"""The three GEMMs of the one-pass fused-linear loss on a block of rows, in Triton, doing no
work for the rows that need none (``gemm="triton"`` in ``backends.linear_one_pass``).

The library GEMMs (cuBLAS, ``linear_blocks``) cannot skip rows without learning their number
on the host (a sync); these kernels read the per-row flags on the device instead:

1. ``_block_logits_kernel``, grid over ``[BLOCK_N, BLOCK_V]`` tiles of the block's logits:
   a tile whose rows hold no completion token computes and stores nothing (the loss kernel
   never reads those rows); the others store ``h @ W.T + b`` rounded to the inputs' dtype, as
   the library GEMM does.  Columns ``>= V`` are never stored.
2. ``dh[rows] = dZ @ W`` (``linear_grad_gemm._dh_kernel``, written once in the inputs'
   dtype): row tiles with no row of nonzero coefficient are written as 0 without a GEMM.
3. ``dW (+)= dZ.T @ h[rows]`` (``linear_grad_gemm._dw_kernel``): the reduction walks only the
   block's row blocks with a nonzero coefficient; written by the first block, accumulated in
   the weight's dtype by the next ones (one rounding per block, as with the library GEMMs).

A row's coefficient is zero when it is masked out, or when its advantage times its
aggregation weight is zero and no KL term is added: GRPO's all-wrong and all-correct groups,
and every padding position, cost no FLOPs in the two gradient GEMMs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .linear_grad_gemm import accumulate_dh, live_row_blocks, write_dw
from .linear_tile import autotuned, grouped, logits_tile, rounded, tiles_for


@autotuned("logits", "h_ptr", key=["D"])
@triton.jit
def _block_logits_kernel(
    h_ptr, w_ptr, b_ptr, live_ptr, z_ptr,
    N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_zn,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    tile_v, tile_n = grouped(tl.program_id(0), tl.cdiv(V, BLOCK_V), tl.cdiv(N, BLOCK_N), GROUP)
    rows = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    if tl.max(tl.load(live_ptr + rows, mask=row_ok, other=0).to(tl.int32), axis=0) > 0:
        cols = tile_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D,
            stride_hn, stride_hd, stride_wv, stride_wd, 1.0, 0.0,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION, UPCAST,
        )
        out = z_ptr + rows.to(tl.int64)[:, None] * stride_zn + cols[None, :]
        tl.store(out, rounded(z, z_ptr.dtype.element_ty, UPCAST), mask=row_ok[:, None] & col_ok[None, :])


class TritonBlockGemms:
    """The GEMMs of ``linear_one_pass`` for ``hidden [N, d]``, ``weight [V, d]``, ``bias [V]``
    over blocks of ``span`` rows.  ``live [N]`` bool: rows whose logits the loss reads;
    ``coefficient [N]`` float: nonzero where a row's gradient may be (zero: skipped in dh/dW)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 live: torch.Tensor, coefficient: torch.Tensor, span: int):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.live, self.coefficient, self.span = live, coefficient, span
        self.tiles = tiles_for(hidden.dtype, hidden.device)
        self.order, self.count = live_row_blocks(coefficient, self.tiles.dw_rows, span)

    def logits(self, z: torch.Tensor, rows: slice) -> None:
        """``z [n, V] = hidden[rows] @ weight.T + bias`` on the row tiles holding a live row."""
        h = self.hidden[rows]
        n, dim = h.shape
        vocab = self.weight.shape[0]
        tiles = self.tiles
        _block_logits_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(vocab, meta["BLOCK_V"]),)](
            h, self.weight, self.weight if self.bias is None else self.bias, self.live[rows], z,
            n, vocab, dim, *h.stride(), *self.weight.stride(), z.stride(0),
            HAS_BIAS=self.bias is not None, GROUP=tiles.group, PRECISION=tiles.precision, UPCAST=tiles.upcast,
        )

    def grads(self, dz: torch.Tensor, rows: slice, dh: Optional[torch.Tensor], dw: Optional[torch.Tensor],
              db: Optional[torch.Tensor]) -> None:
        """One block's share of the gradients from its ``dZ [n, V]``: ``dh[rows] = dZ @ W``,
        ``dW (+)= dZ.T @ h`` (written by the first block), ``db += dZ.sum(0)`` (fp32)."""
        g = self.coefficient[rows]
        vocab = self.weight.shape[0]
        if dh is not None:
            accumulate_dh(dz, self.weight, g, dh[rows], 0, vocab, self.tiles, accumulate=False)
        if dw is not None:
            index = rows.start // self.span
            write_dw(dz, self.hidden[rows], g, (self.order[index], self.count[index:index + 1]), dw, vocab,
                     self.tiles, accumulate=rows.start > 0)
        if db is not None:
            db += dz.sum(0, dtype=torch.float32)
