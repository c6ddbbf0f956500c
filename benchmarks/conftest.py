"""Fixtures of the pytest-benchmark suite (``pytest benchmarks/ --benchmark-only``).

The suite runs the ``suite`` plan of ``lens_kernels.bench.plans`` (one small shape, the torch
backend and the eager reference on the CPU; the target shapes and every implementation on a
GPU), on- and off-policy, over the implementations of ``lens_kernels.bench.registry``: the
same shapes, inputs and correctness gate as ``lens-bench``.  It is not part of the main test
run (``testpaths = ["tests"]``).
"""
from __future__ import annotations

import pytest
import torch

from lens_kernels.bench import check
from lens_kernels.bench.measure import Timer, copy_bandwidth, default_copy_bytes
from lens_kernels.bench.plans import best_device, preset
from lens_kernels.bench.problems import Inputs, Shape
from lens_kernels.bench.runner import Settings, input_copies, off_policy

DEVICE = best_device()
PLAN = preset("suite", DEVICE)


class Problems:
    """Input copies and float64 targets of one shape at a time (the last one asked for), on-
    and off-policy."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.shape = None
        self.copies: dict[str, list[Inputs]] = {}
        self.logp = None
        self.targets: dict[tuple, check.Gold] = {}

    def get(self, shape: Shape, policy: str, mode: str) -> tuple[list[Inputs], check.Gold]:
        if shape != self.shape:
            self.copies, self.logp, self.targets = {}, None, {}
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
            on = input_copies(shape, self.settings)
            self.logp = check.gold_logprobs(on[0])
            self.copies = {"on": on, "off": off_policy(on, self.logp, self.settings.seed)}
            self.shape = shape
        if (policy, mode) not in self.targets:
            self.targets[policy, mode] = check.gold(self.copies[policy][0], mode, self.logp)
        return self.copies[policy], self.targets[policy, mode]


@pytest.fixture(scope="session")
def settings() -> Settings:
    timer = Timer(DEVICE, **PLAN.timer)
    return Settings(timer, copy_bandwidth(timer, default_copy_bytes(DEVICE)))


@pytest.fixture(scope="session")
def problems(settings) -> Problems:
    return Problems(settings)
