"""The two gradient GEMMs of the fused-linear backward, from one vocabulary chunk of ``dZ``.

``dz [N, width]`` (the inputs' dtype) holds ``d loss / d (h @ W.T + b)`` for the columns
``col0 .. col0 + width`` of the vocabulary (``linear_backward``).  Per chunk:

* ``_dh_kernel``, grid over ``[BLOCK_N, BLOCK_D]`` tiles of ``dh``:
  ``acc[N, d] (fp32) += dz @ W[col0 : col0 + width]``, a read-modify-write of the caller's fp32
  accumulator; each element has one owner per launch and chunks run in order, so the sum is
  deterministic.  Tiles whose rows all have ``g == 0`` are skipped (``dz`` is 0 there).
* ``_dw_kernel``, grid over ``[BLOCK_V, BLOCK_D]`` tiles of ``dW[col0 : col0 + width]``:
  ``dz.T @ h`` reduced over all ``N`` in fp32 registers and written once, in ``W``'s dtype.
  The reduction walks only the row blocks that hold a row with ``g != 0``: their indices come
  first in ``live_blocks`` and ``live_count`` says how many (device values, no host sync).

Both kernels are autotuned (``linear_tile.CONFIGS``; ``_dh_kernel`` with its accumulator
restored between the timed configurations).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear_tile import Tiles, autotuned, dot, grouped


@autotuned("dh", "dz_ptr", key=["D"], restore_value=["acc_ptr"])
@triton.jit
def _dh_kernel(
    dz_ptr, w_ptr, g_ptr, acc_ptr,
    N, D, col0, width,
    stride_dz, stride_wv, stride_wd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    tile_d, tile_n = grouped(tl.program_id(0), tl.cdiv(D, BLOCK_D), tl.cdiv(N, BLOCK_N), GROUP)
    rows = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    if tl.sum((g != 0).to(tl.int32), axis=0) > 0:
        dcols = tile_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = dcols < D
        ks = tl.arange(0, BLOCK_K)
        out = acc_ptr + rows.to(tl.int64)[:, None] * D + dcols[None, :]
        acc = tl.load(out, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        dz_rows = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz
        w_cols = w_ptr + dcols.to(tl.int64)[None, :] * stride_wd
        for k0 in range(0, width, BLOCK_K):
            k = k0 + ks
            k_ok = k < width
            a = tl.load(dz_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_cols + (col0 + k).to(tl.int64)[:, None] * stride_wv,
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            acc = dot(a, b, acc, PRECISION, UPCAST)
        tl.store(out, acc, mask=row_ok[:, None] & d_ok[None, :])


@autotuned("dw", "dz_ptr", key=["D"])
@triton.jit
def _dw_kernel(
    dz_ptr, h_ptr, g_ptr, live_ptr, count_ptr, dw_ptr,
    N, D, width,
    stride_dz, stride_hn, stride_hd, stride_dwv, stride_dwd,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    tile_d, tile_v = grouped(tl.program_id(0), tl.cdiv(D, BLOCK_D), tl.cdiv(width, BLOCK_V), GROUP)
    vs = tile_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = vs < width
    dcols = tile_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dcols < D
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_V, BLOCK_D), tl.float32)
    live = tl.load(count_ptr)
    for i in range(0, live):
        rows = tl.load(live_ptr + i).to(tl.int64) * BLOCK_K + ks
        # Rows with g == 0 have dZ = 0; their hidden states are not read (they may be NaN).
        r_ok = (rows < N) & (tl.load(g_ptr + rows, mask=rows < N, other=0.0) != 0)
        a = tl.load(dz_ptr + rows[None, :] * stride_dz + vs[:, None], mask=v_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(h_ptr + rows[:, None] * stride_hn + dcols.to(tl.int64)[None, :] * stride_hd,
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        acc = dot(a, b, acc, PRECISION, UPCAST)
    out = dw_ptr + vs.to(tl.int64)[:, None] * stride_dwv + dcols[None, :] * stride_dwd
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=v_ok[:, None] & d_ok[None, :])


def live_row_blocks(grad_logp: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(live_blocks, live_count)``: indices of the ``block``-row blocks holding a nonzero
    ``grad_logp``, first and in order (int32 ``[cdiv(N, block)]``), and their number (int32 ``[1]``)."""
    blocks = triton.cdiv(grad_logp.numel(), block)
    flags = grad_logp.new_zeros(blocks * block, dtype=torch.bool)
    flags[: grad_logp.numel()] = grad_logp != 0
    flags = flags.view(blocks, block).any(1)
    order = torch.argsort((~flags).to(torch.int8), stable=True).to(torch.int32)
    return order, flags.sum(dtype=torch.int32).reshape(1)


def accumulate_dh(dz: torch.Tensor, weight: torch.Tensor, grad_logp: torch.Tensor, acc: torch.Tensor,
                  col0: int, width: int, tiles: Tiles) -> None:
    """``acc += dz[:, :width] @ weight[col0 : col0 + width]`` (``acc [N, d]`` fp32 contiguous)."""
    rows, dim = acc.shape
    _dh_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_N"]) * triton.cdiv(dim, meta["BLOCK_D"]),)](
        dz, weight, grad_logp, acc, rows, dim, col0, width, dz.stride(0), *weight.stride(),
        GROUP=tiles.group, PRECISION=tiles.precision, UPCAST=tiles.upcast,
    )


def write_dw(dz: torch.Tensor, hidden: torch.Tensor, grad_logp: torch.Tensor, live: tuple[torch.Tensor, torch.Tensor],
             dw: torch.Tensor, width: int, tiles: Tiles) -> None:
    """``dw = dz[:, :width].T @ hidden`` for one chunk (``dw [width, d]``, a view of the full
    gradient); ``live`` from :func:`live_row_blocks` with ``tiles.dw_rows``."""
    rows, dim = hidden.shape
    _dw_kernel[lambda meta: (triton.cdiv(width, meta["BLOCK_V"]) * triton.cdiv(dim, meta["BLOCK_D"]),)](
        dz, hidden, grad_logp, live[0], live[1], dw,
        rows, dim, width, dz.stride(0), *hidden.stride(), *dw.stride(),
        BLOCK_K=tiles.dw_rows, GROUP=tiles.group, PRECISION=tiles.precision, UPCAST=tiles.upcast,
    )
