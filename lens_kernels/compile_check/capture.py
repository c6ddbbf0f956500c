"""The kernel specializations that the launchers really produce, for a GPU that is not there.

A stand-in for Triton's CUDA driver answers one question, the target (``GPUTarget("cuda",
arch, 32)``), so that each kernel's own binder specializes the launch exactly as on that GPU
(argument types, divisibility by 16, integers equal to 1, constexprs, options).  Triton's
``jit_cache_hook`` then records the specialization (Triton's own serialized form, the one
``JITFunction.preload`` compiles) and cancels the compilation and the launch.  Autotuned
kernels are expanded into every candidate that their pruning keeps (no timing run).

The launchers run on ``meta`` tensors: shapes, strides, dtypes and offsets are real, no memory
is allocated and no kernel runs.  Needs Triton without its interpreter (``TRITON_INTERPRET``
unset before ``triton`` is imported).
"""
from __future__ import annotations

import contextlib
import json
from typing import Callable, Iterator, NamedTuple

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver


class Specialization(NamedTuple):
    """One compilation of one kernel: ``data`` is Triton's serialized specialization (JSON:
    the kernel's full name, signature, constexprs, attributes and options), ``case`` the first
    launch sequence that produced it, ``measured`` whether it is the first autotune candidate
    of its list (the configuration measured on an H100, ``linear_tile.gpu_configs``)."""

    arch: int
    data: str
    case: str
    measured: bool = False

    @property
    def kernel(self) -> str:
        """``module.name`` of the ``@triton.jit`` function."""
        return json.loads(self.data)["name"]


class StandInDriver(DriverBase):
    """A driver for a GPU that is not there: it knows its target, nothing else.  Its device
    number is the architecture, so that each kernel's per-device cache (binder, backend and
    target, made on first use) is never shared between two stand-in targets."""

    def __init__(self, arch: int):
        super().__init__()
        self.target = GPUTarget("cuda", arch, 32)

    @classmethod
    def is_active(cls) -> bool:
        return False

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")

    def get_benchmarker(self):
        raise RuntimeError("a stand-in driver cannot time kernels")

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("a stand-in driver builds no launcher")


@contextlib.contextmanager
def stand_in(arch: int) -> Iterator[None]:
    """Triton's active driver is a :class:`StandInDriver` for ``sm_<arch>`` inside (restored
    after: ``driver.reset_active`` would look for a real GPU, and fail without one)."""
    previous = driver._active
    driver.set_active(StandInDriver(arch))
    try:
        yield
    finally:
        driver.set_active(previous)


def record_launches(arch: int, cases: Iterator[tuple[str, Callable[[], None]]]) -> list[Specialization]:
    """The distinct specializations for ``sm_<arch>`` of every launch made by the ``cases``
    (``(label, run)`` pairs), in first-seen order."""
    found: dict[str, Specialization] = {}
    label, candidate = "", None

    def every_candidate(self: Autotuner, *args, **kwargs) -> None:
        """``Autotuner.run`` launching every candidate its pruning keeps, untimed."""
        nonlocal candidate
        self.nargs = dict(zip(self.arg_names, args))
        for candidate, config in enumerate(self.prune_configs(kwargs)):
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs, candidate = None, None

    def record(*, compile, **_) -> bool:
        data = compile["specialization_data"]
        found.setdefault(data, Specialization(arch, data, label, candidate == 0))
        return True  # compiled elsewhere: skip the compilation, and so the launch

    previous_hook, previous_run = knobs.runtime.jit_cache_hook, Autotuner.run
    knobs.runtime.jit_cache_hook, Autotuner.run = record, every_candidate
    try:
        with stand_in(arch):
            for label, run in cases:
                run()
    finally:
        knobs.runtime.jit_cache_hook, Autotuner.run = previous_hook, previous_run
    return list(found.values())
