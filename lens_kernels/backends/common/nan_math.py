"""NaN-propagating minimum and maximum for Triton kernels, as torch's: Triton's default
``tl.minimum``/``tl.maximum`` drop a NaN operand.  Written with compares and selects, which
compile for every float type (float64 included) on every target."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def nan_minimum(a, b):
    """``min(a, b)``, NaN when either is (``b`` may be a scalar argument)."""
    b = tl.zeros_like(a) + b
    return tl.where((a != a) | (b != b), a + b, tl.minimum(a, b))


@triton.jit
def nan_maximum(a, b):
    """``max(a, b)``, NaN when either is (``b`` may be a scalar argument)."""
    b = tl.zeros_like(a) + b
    return tl.where((a != a) | (b != b), a + b, tl.maximum(a, b))
