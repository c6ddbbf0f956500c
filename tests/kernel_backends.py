"""The kernel backends a test can run here, for tests that call the ops or launchers directly
(the public functions accept only backends available for the tensors' device, and the cuda
backend runs on CPU tensors only through the host emulation of csrc/)."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import torch

from lens_kernels.backends.cuda import library

from .conftest import DEVICE, interpreting
from .test_cuda_backend import build_emulated_library, require_gpu_library

KERNEL_BACKENDS = ("torch", "triton", "cuda")


@functools.lru_cache(maxsize=None)
def emulated_library() -> Path:
    """csrc/ built for the host once per test process."""
    return build_emulated_library(Path(tempfile.mkdtemp(prefix="csrc_emulated_")))


def use_backend(name: str, monkeypatch) -> torch.device:
    """Make backend ``name`` runnable (the emulated csrc/ library for cuda on the CPU) or skip;
    returns the device its tensors live on.  Clear ``library.load``'s cache after the test."""
    library.load.cache_clear()
    if name == "triton" and DEVICE == "cpu" and not interpreting():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    if name == "cuda":
        if DEVICE == "cuda":
            require_gpu_library()
        else:
            monkeypatch.setenv(library.LIBRARY_ENV, str(emulated_library()))
            monkeypatch.setenv("LK_EMU_MAX_BLOCKS", "3")
    return torch.device(DEVICE)


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request, monkeypatch):
    """``(name, device)`` for each backend that runs here."""
    device = use_backend(request.param, monkeypatch)
    yield request.param, device
    library.load.cache_clear()
