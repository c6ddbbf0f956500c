"""The loss and the token metrics from per-row (or per-program) partials: one program, fixed
order (deterministic), fp32 outputs, no host sync."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .calibrate import TOKENS_C
from .launch import launch

_BLOCK = 1024


@triton.jit
def _finalize_kernel(parts_ptr, totals_ptr, loss_ptr, clip_ptr, kl_ptr, P, HAS_REF: tl.constexpr, BLOCK: tl.constexpr):
    loss = tl.zeros((BLOCK,), tl.float64)
    clipped = tl.zeros((BLOCK,), tl.float64)
    k3 = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, P, BLOCK):
        offs = (start + tl.arange(0, BLOCK)).to(tl.int64)
        inside = offs < P
        loss += tl.load(parts_ptr + offs, mask=inside, other=0.0)
        clipped += tl.load(parts_ptr + P + offs, mask=inside, other=0.0)
        if HAS_REF:
            k3 += tl.load(parts_ptr + 2 * P + offs, mask=inside, other=0.0)
    tokens = tl.maximum(tl.load(totals_ptr + TOKENS_C), 1.0)
    tl.store(loss_ptr, tl.sum(loss, axis=0).to(tl.float32))
    tl.store(clip_ptr, (tl.sum(clipped, axis=0) / tokens).to(tl.float32))
    if HAS_REF:
        tl.store(kl_ptr, (tl.sum(k3, axis=0) / tokens).to(tl.float32))


def finalize(parts: torch.Tensor, totals: torch.Tensor, has_ref: bool) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(loss, clip_fraction, kl or None)``, 0-dim fp32, from ``parts [3, P]`` float64 (the
    weighted loss, clipped-token count and k3 sum of each program) and the calibration's
    ``totals``."""
    device = parts.device
    loss, clip = torch.empty((), device=device), torch.empty((), device=device)
    kl = torch.empty((), device=device) if has_ref else None
    launch(
        _finalize_kernel, (1,), parts, totals, loss, clip, kl if has_ref else clip, parts.shape[1],
        HAS_REF=has_ref, BLOCK=_BLOCK, num_warps=4,
    )
    return loss, clip, kl
