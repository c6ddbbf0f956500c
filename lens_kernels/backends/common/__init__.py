"""Triton kernels shared by the GPU backends (triton and cuda): the O(B) calibration before
the vocabulary pass, the reduction of the loss partials after it, and the backward's scaling
by ``grad_output``.  The per-backend code is only the vocabulary and token kernels."""
from .calibrate import Calibration, calibrate
from .finalize import finalize
from .scale import scale_rows_

__all__ = ["Calibration", "calibrate", "finalize", "scale_rows_"]
