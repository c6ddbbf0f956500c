"""The backward of the one-pass loss: the forward already wrote d loss / d logits, so the
backward only multiplies it by ``grad_output``, in place, and only when that is not 1.  The
test happens on the device (no host sync, capturable): each program reads the scalar and
returns at once when it is 1, which is what a training loop passes."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import launch, next_power_of_2

_BLOCK = 4096
_PROGRAMS_PER_SM = 4


@triton.jit(do_not_specialize=["T", "rows"])
def _scale_rows_kernel(
    grad_ptr, scale_ptr, rows, T, V, stride_b, stride_t, stride_v, BLOCK: tl.constexpr,
):
    g = tl.load(scale_ptr).to(tl.float32)
    if g != 1.0:
        lanes = tl.arange(0, BLOCK)
        for row in range(tl.program_id(0), rows, tl.num_programs(0)):
            row64 = row + tl.zeros((), tl.int64)  # 64-bit offsets (a plain int in the interpreter)
            b = row64 // T
            base = grad_ptr + b * stride_b + (row64 - b * T) * stride_t
            for start in range(0, V, BLOCK):
                cols = start + lanes
                ptrs = base + cols.to(tl.int64) * stride_v
                x = tl.load(ptrs, mask=cols < V, other=0.0)
                tl.store(ptrs, (x.to(tl.float32) * g).to(grad_ptr.dtype.element_ty), mask=cols < V)


@functools.lru_cache(maxsize=None)
def _programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def scale_rows_(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """``grad [B, T, V] *= grad_output`` (0-dim) in place, any strides; returns ``grad``."""
    batch, length, vocab = grad.shape
    rows = batch * length
    if rows == 0:
        return grad
    launch(
        _scale_rows_kernel, (min(rows, _programs(grad.device)),), grad, grad_output, rows, length, vocab, *grad.stride(),
        BLOCK=min(next_power_of_2(vocab), _BLOCK), num_warps=8,
    )
    return grad
