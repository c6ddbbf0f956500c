"""Shared fixtures: seeding, NaN-filled ``torch.empty``, and the list of runnable backends."""
from __future__ import annotations

import os

import torch

# Without a GPU, the Triton kernels run on the CPU through Triton's interpreter; the variable
# must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lens_kernels as lk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def runnable_backends() -> list[str]:
    """Backends that run here: torch always; triton on CUDA, or on the CPU through the
    interpreter when ``TRITON_INTERPRET=1``; cuda where the compiled library loads."""
    names = ["torch"]
    for name in ("triton", "cuda"):
        if lk.is_available(name, torch.device(DEVICE)):
            names.append(name)
    return names


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def nan_empty():
    """Make every ``torch.empty``-style allocation start as NaN, so an output a kernel forgot
    to write shows up as NaN instead of stale zeros."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    torch.utils.deterministic.fill_uninitialized_memory = fill


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
