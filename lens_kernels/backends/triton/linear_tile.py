"""What the fused-linear kernels share: one logit tile ``z = (h @ W.T + b) * inv_t`` and the
block sizes.

``logits_tile`` computes a ``[BLOCK_N, BLOCK_V]`` fp32 tile from ``hidden [N, d]`` and
``weight [V, d]`` (any strides) by a ``tl.dot`` loop over ``d`` in ``BLOCK_K`` steps with fp32
accumulation; rows ``>= N`` and ``d``-lanes ``>= d`` load 0, vocabulary columns ``>= V`` come out
``-inf`` (never 0: a 0 there would be a phantom token in the softmax).  fp32 inputs use IEEE
dot precision (``PRECISION = "ieee"``), so fp32 results match PyTorch's fp32 matmul, which does
not use TF32 by default; bf16/fp16 inputs use the tensor cores with fp32 accumulation.  Every
dot goes through ``dot``: Triton's CPU interpreter multiplies the raw bits of 2-byte floats in
``tl.dot``, so there (``UPCAST``) the operands are widened to fp32 first, which gives the same
exact products and fp32 sums as the tensor cores.

Offsets are int64 before they meet a stride: ``V * d`` and ``N * d`` may pass ``2**31``.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def logits_tile(
    h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D,
    stride_hn, stride_hd, stride_wv, stride_wd, inv_t,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``[BLOCK_N, BLOCK_V]`` fp32 logits of ``rows`` x ``cols``, ``-inf`` where ``~col_ok``."""
    ks = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hn
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + ks
        k_ok = k < D
        h = tl.load(h_rows + k.to(tl.int64)[None, :] * stride_hd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + k.to(tl.int64)[:, None] * stride_wd, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = dot(h, w, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc * inv_t, float("-inf"))


class Blocks(NamedTuple):
    """Tile sizes and launch options of the fused-linear kernels for one input dtype."""

    n: int  # rows of hidden per tile
    v: int  # vocabulary columns per tile
    k: int  # reduction step (over d in the logit tiles, over N or V in the gradient GEMMs)
    d: int  # columns of d per gradient tile
    tiles_per_split: int  # vocabulary tiles one forward program walks (one partial per split)
    group: int  # tiles of the slower grid axis launched together (L2 reuse)
    num_warps: int
    num_stages: int
    precision: str  # tl.dot input_precision
    upcast: bool  # widen 2-byte operands to fp32 before tl.dot (the CPU interpreter)

    @property
    def split_cols(self) -> int:
        return self.v * self.tiles_per_split


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def blocks_for(dtype: torch.dtype, device: torch.device) -> Blocks:
    """Tiles for ``dtype`` on ``device``.  On the CPU (Triton's interpreter) tiles are tiny, so
    that tests on tiny shapes still cross every tile and split boundary.  GPU values are
    unmeasured starting points (128x128x64 tensor-core tiles, 8 warps, 3 stages for 2-byte
    inputs; half-size tiles for fp32 with IEEE dots)."""
    precision = "ieee" if dtype == torch.float32 else "tf32"
    if torch.device(device).type == "cpu" or interpreting():
        return Blocks(16, 32, 16, 32, 2, 2, 1, 1, precision, dtype != torch.float32)
    if dtype == torch.float32:
        return Blocks(64, 64, 32, 64, 32, 8, 4, 2, precision, False)
    return Blocks(128, 128, 64, 128, 16, 8, 8, 3, precision, False)


@triton.jit
def grouped(pid, tiles_fast, tiles_slow, GROUP: tl.constexpr):
    """``pid -> (fast, slow)`` tile coordinates, ``GROUP`` slow tiles per band, so that
    programs running together share operands in L2 (the Triton matmul tutorial's ordering)."""
    per_band = GROUP * tiles_fast
    band = pid // per_band
    first = band * GROUP
    size = tl.minimum(tiles_slow - first, GROUP)
    slow = first + (pid % per_band) % size
    fast = (pid % per_band) // size
    return fast, slow
