"""What the fused-linear kernels share: one logit tile ``z = (h @ W.T + b) / t``, the
fixed sizes (``Tiles``) and the autotuned tile configurations (``CONFIGS``, ``autotuned``).

``logits_tile`` computes a ``[BLOCK_N, BLOCK_V]`` fp32 tile from ``hidden [N, d]`` and
``weight [V, d]`` (any strides) by a ``tl.dot`` loop over ``d`` in ``BLOCK_K`` steps with fp32
accumulation; rows ``>= N`` and ``d``-lanes ``>= d`` load 0, vocabulary columns ``>= V`` come out
``-inf`` (never 0: a 0 there would be a phantom token in the softmax).  The scaling by
``1 / t`` is ``fma(x, hi, x * lo)`` with ``(hi, lo) = config.split_float(1 / t)`` (unbiased,
where ``x * fp32(1 / t)`` gives every fp32 log-prob the same relative bias); an infinite ``x``
(a ``-inf`` bias) takes ``x * hi`` alone (``inf * lo`` is NaN where ``lo`` is 0).  fp32 inputs use IEEE
dot precision (``PRECISION = "ieee"``), so fp32 results match PyTorch's fp32 matmul, which does
not use TF32 by default; bf16/fp16 inputs use the tensor cores with fp32 accumulation.  Every
dot goes through ``dot``: Triton's CPU interpreter multiplies the raw bits of 2-byte floats in
``tl.dot``, so there (``UPCAST``) the operands are widened to fp32 first, which gives the same
exact products and fp32 sums as the tensor cores.

Offsets are int64 before they meet a stride: ``V * d`` and ``N * d`` may pass ``2**31``.
"""
from __future__ import annotations

import inspect
import os
from typing import NamedTuple, Optional

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
def rounded(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 ``x`` in ``dtype``, rounded to nearest even.  Triton's CPU interpreter truncates in
    ``.to(bfloat16)``, so there (``EMULATE``) bf16 is rounded on the bits first, which makes the
    conversion exact; fp16 stays truncated under the interpreter."""
    if EMULATE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    return x.to(dtype)


@triton.jit
def scaled(x, inv_t_hi, inv_t_lo):
    """``x / t`` as ``fma(x, hi, x * lo)``; ``x * hi`` where ``x`` is infinite."""
    return tl.where(tl.abs(x) < float("inf"), tl.fma(x, inv_t_hi, x * inv_t_lo), x * inv_t_hi)


@triton.jit
def logits_tile(
    h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D,
    stride_hn, stride_hd, stride_wv, stride_wd, inv_t_hi, inv_t_lo,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``[BLOCK_N, BLOCK_V]`` fp32 logits of ``rows`` x ``cols`` scaled by ``1 / t`` (its fp32
    parts ``inv_t_hi``, ``inv_t_lo``), ``-inf`` where ``~col_ok``."""
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
    return tl.where(col_ok[None, :], scaled(acc, inv_t_hi, inv_t_lo), float("-inf"))


class Tiles(NamedTuple):
    """What the fused-linear launchers fix for one input dtype; the tile shapes, warps and
    pipeline depth of each kernel are picked by ``autotuned`` among ``CONFIGS``."""

    split_cols: int  # vocabulary columns per forward partial (a multiple of every BLOCK_V)
    chunk_align: int  # the backward's vocabulary chunks are a multiple of this (every BLOCK_V)
    dw_rows: int  # rows per step of the dW reduction over N (its live-block granularity)
    group: int  # tiles of the slower grid axis launched together (L2 reuse)
    precision: str  # tl.dot input_precision
    upcast: bool  # widen 2-byte operands to fp32 before tl.dot (the CPU interpreter)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tiles_for(dtype: torch.dtype, device: torch.device) -> Tiles:
    """The fixed sizes for ``dtype`` on ``device``.  On the CPU (Triton's interpreter) tiles
    are tiny, so that tests on tiny shapes still cross every tile and split boundary."""
    precision = "ieee" if dtype == torch.float32 else "tf32"
    if torch.device(device).type == "cpu" or interpreting():
        return Tiles(64, 32, 16, 2, precision, dtype != torch.float32)
    return Tiles(2048, 256, 64, 8, precision, False)


def gpu_configs() -> dict[str, dict[int, list[triton.Config]]]:
    """Candidates per kernel family and input element size (2: bf16/fp16 on the tensor cores
    with fp32 accumulation; 4: fp32 with IEEE dots, half-size tiles).  The first of each list
    is the configuration measured on an H100 before autotuning (benchmarks/NOTES.md, issue 9).
    Every ``BLOCK_V`` divides the GPU ``Tiles.split_cols`` and ``chunk_align``.  No candidate
    but the measured one spills registers on sm_90 in any kernel of its family at the
    production shapes of issue 19 (``python -m lens_kernels.compile_check --full``; in CI,
    ``tests/test_compile_targets.py`` at one shape per dtype); those that did were removed, no
    GPU measurement justifying them (benchmarks/NOTES.md, issue 19)."""
    return {
        "logits": {  # [BLOCK_N, BLOCK_V] logit tiles, a loop over d in BLOCK_K steps
            2: [_config(8, 3, BLOCK_N=128, BLOCK_V=128, BLOCK_K=64)],
            4: [_config(4, 2, BLOCK_N=64, BLOCK_V=64, BLOCK_K=32), _config(8, 2, BLOCK_N=128, BLOCK_V=64, BLOCK_K=32)],
        },
        "dh": {  # [BLOCK_N, BLOCK_D] tiles of dh, a loop over the chunk's columns in BLOCK_K steps
            2: [_config(8, 3, BLOCK_N=128, BLOCK_D=128, BLOCK_K=64)],
            4: [_config(4, 2, BLOCK_N=64, BLOCK_D=64, BLOCK_K=32), _config(8, 2, BLOCK_N=128, BLOCK_D=64, BLOCK_K=32)],
        },
        "dw": {  # [BLOCK_V, BLOCK_D] tiles of dW, a loop over the live row blocks (Tiles.dw_rows)
            2: [_config(8, 3, BLOCK_V=128, BLOCK_D=128)],
            4: [_config(4, 2, BLOCK_V=64, BLOCK_D=64)],
        },
    }


def interpreter_configs() -> dict[str, dict[int, list[triton.Config]]]:
    """One tiny configuration per family, the same object for both element sizes (so the
    autotuner never benchmarks: the interpreter cannot time)."""
    return {family: dict.fromkeys((2, 4), [_config(1, 1, **blocks)]) for family, blocks in (
        ("logits", dict(BLOCK_N=16, BLOCK_V=32, BLOCK_K=16)),
        ("dh", dict(BLOCK_N=16, BLOCK_D=32, BLOCK_K=16)),
        ("dw", dict(BLOCK_V=32, BLOCK_D=32)),
    )}


def _config(warps: int, stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


def _measured_only(configs: dict[str, dict[int, list[triton.Config]]]) -> dict[str, dict[int, list[triton.Config]]]:
    """Each list cut to its first entry: no autotuning (``LENS_KERNELS_AUTOTUNE=0``)."""
    return {family: {size: found[:1] for size, found in by_size.items()} for family, by_size in configs.items()}


# LENS_KERNELS_AUTOTUNE=0 (read at import) keeps the first candidate of each list and times
# nothing on a kernel's first call for each (d, dtype), e.g. for test suites over many shapes.
TUNING = os.environ.get("LENS_KERNELS_AUTOTUNE", "1") != "0"
CONFIGS = interpreter_configs() if interpreting() else gpu_configs()
if not TUNING:
    CONFIGS = _measured_only(CONFIGS)


def _for_dtype(family: str, operand: str):
    """``early_config_prune``: the candidates of ``family`` for the element size of ``operand``."""
    def prune(configs, named_args, **_):
        wanted = CONFIGS[family][named_args[operand].element_size()]
        return [c for c in configs if c in wanted]
    return prune


def _untimed(kernel_call, quantiles=None, **_):
    """``do_bench`` that runs nothing: with one candidate left, no timing run (Triton before
    3.7 times even a single pruned candidate)."""
    return [0.0, 0.0, 0.0]


def _restore_when_accumulating(names: list[str]):
    """``(pre_hook, post_hook)`` saving ``names`` before each timed run of a kernel launched
    with ``ACCUMULATE=True`` and restoring them after (written-once outputs need nothing)."""
    saved: dict = {}

    def pre_hook(kwargs, reset_only=False):
        if kwargs.get("ACCUMULATE") and not reset_only:
            saved.update({name: kwargs[name].clone() for name in names})

    def post_hook(kwargs, exception):
        for name in list(saved):
            kwargs[name].copy_(saved.pop(name))

    return pre_hook, post_hook


_AUTOTUNE_ARGS = inspect.signature(triton.autotune).parameters


def autotuned(family: str, operand: str, key: list[str], accumulates: Optional[list[str]] = None):
    """``triton.autotune`` over ``CONFIGS[family]``, pruned to the element size of the
    pointer argument ``operand``.  ``key`` leaves out ``N``, ``T`` and ``V`` (a new batch or
    vocabulary never re-times the candidates, as it never recompiles the kernels); argument
    dtypes are part of Triton's key already.  ``accumulates``: arguments the kernel
    reads and writes when launched with ``ACCUMULATE=True``, restored between the timed
    configurations.  Picks are cached on disk (``cache_results``, Triton >= 3.2), so later
    processes on the machine reuse them."""
    configs = list({id(c): c for size in (2, 4) for c in CONFIGS[family][size]}.values())
    options: dict = {"prune_configs_by": {"early_config_prune": _for_dtype(family, operand)}}
    if not TUNING and "do_bench" in _AUTOTUNE_ARGS:
        options["do_bench"] = _untimed
    elif "cache_results" in _AUTOTUNE_ARGS:
        options["cache_results"] = True
    if accumulates and "post_hook" in _AUTOTUNE_ARGS:
        options["pre_hook"], options["post_hook"] = _restore_when_accumulating(accumulates)
    elif accumulates:
        options["restore_value"] = accumulates
    return triton.autotune(configs, key=key, **options)


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
