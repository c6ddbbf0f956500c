"""The CUDA backend: the ahead-of-time kernels of csrc/ (vocabulary pass, its backward, the
group epilogue) behind a C ABI, loaded with ctypes; no PyTorch headers are involved.

``is_available(device)`` says whether they can run there (library built, CUDA device, driver
and image fit); the launchers follow ``lens_kernels/backends/__init__.py``.
"""
from .launchers import epilogue_forward, logprobs_backward, logprobs_forward
from .library import is_available

__all__ = ["is_available", "logprobs_forward", "logprobs_backward", "epilogue_forward"]
