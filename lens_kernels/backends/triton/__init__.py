"""Triton backend: the vocabulary pass (``logprobs``), the one-pass loss (``fused_loss``) and
the two-pass token kernel (``token_loss``); the calibration around them is shared with the
cuda backend (``lens_kernels.backends.common``).

Runs on CUDA devices, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1`` set
before ``triton`` is imported), which is how it is tested without a GPU.  Importing this
package raises ImportError when triton is missing, which ``lens_kernels.backends`` reads as
"not available".
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .fused_loss import fused_loss
from .logprobs import logprobs_backward, logprobs_forward
from .token_loss import token_loss

__all__ = ["is_available", "logprobs_forward", "logprobs_backward", "fused_loss", "token_loss"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_available(device: Optional[torch.device] = None) -> bool:
    """True for CUDA devices, and for the CPU when Triton's interpreter is on."""
    if device is None:
        return torch.cuda.is_available() or _interpreting()
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _interpreting()
