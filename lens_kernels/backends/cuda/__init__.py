"""The CUDA backend: the ahead-of-time kernels of csrc/ (vocabulary pass and its backward, the
one-pass loss, the two-pass token kernel) behind a C ABI, loaded with ctypes; no PyTorch
headers are involved.  The calibration around them is shared with the triton backend
(``lens_kernels.backends.common``).

``is_available(device)`` says whether they can run there (library built, CUDA device, driver
and image fit); the launchers follow ``lens_kernels/backends/__init__.py``.
"""
from .launchers import fused_loss, logprobs_backward, logprobs_forward, token_loss
from .library import is_available

__all__ = ["is_available", "logprobs_forward", "logprobs_backward", "fused_loss", "token_loss"]
