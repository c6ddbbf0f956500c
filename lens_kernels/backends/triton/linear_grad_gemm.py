"""The two gradient GEMMs of the fused-linear backward, from one vocabulary chunk of ``dZ``.

``dz [N, width]`` (the inputs' dtype) holds ``d loss / d (h @ W.T + b)`` for the columns
``col0 .. col0 + width`` of the vocabulary (``linear_backward``).  Per chunk:

* ``_dh_kernel``, grid over ``[BLOCK_N, BLOCK_D]`` tiles of ``dh``: with ``ACCUMULATE``,
  ``acc[N, d] (fp32) += dz @ W[col0 : col0 + width]``, a read-modify-write of the caller's fp32
  accumulator (each element has one owner per launch and chunks run in order, so the sum is
  deterministic); without, ``dh = dz @ W`` written once in its own dtype (the one pass's
  blocks, ``linear_block_gemm``).  Tiles whose rows all have ``g == 0`` are skipped (``dz`` is
  0 there): left as they are when accumulating, written as 0 otherwise.
* ``_dw_kernel``, grid over ``[BLOCK_V, BLOCK_D]`` tiles of ``dW[col0 : col0 + width]``:
  ``dz.T @ h`` reduced over all ``N`` in fp32 registers, written once in ``W``'s dtype, or
  added to it with ``ACCUMULATE`` (the one pass's later blocks).  The reduction walks only the
  row blocks that hold a row with ``g != 0``: their indices come first in ``live_blocks`` and
  ``live_count`` says how many (device values, no host sync).

Both kernels are autotuned (``linear_tile.CONFIGS``), the argument they accumulate into saved
and restored around each timed configuration when launched with ``ACCUMULATE``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .linear_tile import Tiles, autotuned, dot, grouped, rounded


@autotuned("dh", "dz_ptr", key=["D"], accumulates=["out_ptr"])
@triton.jit
def _dh_kernel(
    dz_ptr, w_ptr, g_ptr, out_ptr,
    N, D, col0, width,
    stride_dz, stride_wv, stride_wd,
    ACCUMULATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    tile_d, tile_n = grouped(tl.program_id(0), tl.cdiv(D, BLOCK_D), tl.cdiv(N, BLOCK_N), GROUP)
    rows = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    dcols = tile_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dcols < D
    out = out_ptr + rows.to(tl.int64)[:, None] * D + dcols[None, :]
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    if tl.sum((g != 0).to(tl.int32), axis=0) > 0:
        ks = tl.arange(0, BLOCK_K)
        if ACCUMULATE:
            acc = tl.load(out, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dz_rows = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz
        w_cols = w_ptr + dcols.to(tl.int64)[None, :] * stride_wd
        for k0 in range(0, width, BLOCK_K):
            k = k0 + ks
            k_ok = k < width
            a = tl.load(dz_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_cols + (col0 + k).to(tl.int64)[:, None] * stride_wv,
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            acc = dot(a, b, acc, PRECISION, UPCAST)
        tl.store(out, rounded(acc, out_ptr.dtype.element_ty, UPCAST), mask=row_ok[:, None] & d_ok[None, :])
    elif not ACCUMULATE:
        tl.store(out, tl.zeros((BLOCK_N, BLOCK_D), out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@autotuned("dw", "dz_ptr", key=["D"], accumulates=["dw_ptr"])
@triton.jit
def _dw_kernel(
    dz_ptr, h_ptr, g_ptr, live_ptr, count_ptr, dw_ptr,
    N, D, width,
    stride_dz, stride_hn, stride_hd, stride_dwv, stride_dwd,
    ACCUMULATE: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    tile_d, tile_v = grouped(tl.program_id(0), tl.cdiv(D, BLOCK_D), tl.cdiv(width, BLOCK_V), GROUP)
    vs = tile_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = vs < width
    dcols = tile_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dcols < D
    out = dw_ptr + vs.to(tl.int64)[:, None] * stride_dwv + dcols[None, :] * stride_dwd
    live = tl.load(count_ptr)
    # Accumulating, a span with no live row block leaves dW as it is (not even read).
    if (live > 0) | (not ACCUMULATE):
        ks = tl.arange(0, BLOCK_K)
        if ACCUMULATE:
            acc = tl.load(out, mask=v_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        else:
            acc = tl.zeros((BLOCK_V, BLOCK_D), tl.float32)
        for i in range(0, live):
            rows = tl.load(live_ptr + i).to(tl.int64) * BLOCK_K + ks
            # Rows with g == 0 have dZ = 0; their hidden states are not read (they may be NaN).
            r_ok = (rows < N) & (tl.load(g_ptr + rows, mask=rows < N, other=0.0) != 0)
            a = tl.load(dz_ptr + rows[None, :] * stride_dz + vs[:, None], mask=v_ok[:, None] & r_ok[None, :],
                        other=0.0)
            b = tl.load(h_ptr + rows[:, None] * stride_hn + dcols.to(tl.int64)[None, :] * stride_hd,
                        mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            acc = dot(a, b, acc, PRECISION, UPCAST)
        tl.store(out, rounded(acc, dw_ptr.dtype.element_ty, UPCAST), mask=v_ok[:, None] & d_ok[None, :])


def live_row_blocks(g: torch.Tensor, block: int, span: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(live_blocks, live_count)`` of ``g [N]`` cut into spans of ``span`` rows (default: one
    span): per span, the indices of its ``block``-row blocks that hold a nonzero ``g``, first
    and in order, counted from the span's first row (int32 ``[spans, cdiv(span, block)]``), and
    their number (int32 ``[spans]``).  Device values only: no host sync."""
    rows = g.numel()
    span = max(1, rows if span is None else span)
    spans, per_span = max(1, triton.cdiv(rows, span)), triton.cdiv(span, block)
    flags = g.new_zeros(spans * span, dtype=torch.bool)
    flags[:rows] = g != 0
    padded = flags.new_zeros((spans, per_span * block))
    padded[:, :span] = flags.view(spans, span)
    flags = padded.view(spans, per_span, block).any(2)
    order = torch.argsort((~flags).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return order, flags.sum(1, dtype=torch.int32)


def accumulate_dh(dz: torch.Tensor, weight: torch.Tensor, g: torch.Tensor, out: torch.Tensor,
                  col0: int, width: int, tiles: Tiles, accumulate: bool = True) -> None:
    """``out (+)= dz[:, :width] @ weight[col0 : col0 + width]`` (``out [N, d]`` contiguous: an
    fp32 accumulator, or written once in the inputs' dtype with ``accumulate=False``); row
    tiles whose rows all have ``g == 0`` are skipped (left as they are, or written as 0)."""
    rows, dim = out.shape
    _dh_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_N"]) * triton.cdiv(dim, meta["BLOCK_D"]),)](
        dz, weight, g, out, rows, dim, col0, width, dz.stride(0), *weight.stride(),
        ACCUMULATE=accumulate, GROUP=tiles.group, PRECISION=tiles.precision, UPCAST=tiles.upcast,
    )


def write_dw(dz: torch.Tensor, hidden: torch.Tensor, g: torch.Tensor, live: tuple[torch.Tensor, torch.Tensor],
             dw: torch.Tensor, width: int, tiles: Tiles, accumulate: bool = False) -> None:
    """``dw (+)= dz[:, :width].T @ hidden`` over the rows with ``g != 0`` (``dw [width, d]``, a
    view of the full gradient); ``live``: one span's ``live_row_blocks`` with ``tiles.dw_rows``
    (``[per_span]`` and ``[1]``)."""
    rows, dim = hidden.shape
    _dw_kernel[lambda meta: (triton.cdiv(width, meta["BLOCK_V"]) * triton.cdiv(dim, meta["BLOCK_D"]),)](
        dz, hidden, g, live[0], live[1], dw,
        rows, dim, width, dz.stride(0), *hidden.stride(), *dw.stride(),
        ACCUMULATE=accumulate, BLOCK_K=tiles.dw_rows, GROUP=tiles.group, PRECISION=tiles.precision,
        UPCAST=tiles.upcast,
    )
