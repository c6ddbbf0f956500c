"""One captured specialization compiled to a cubin for its stand-in target, with what ptxas
says of it: registers, spills, stack, and the shared memory Triton allocated.

``CompiledKernel.n_regs`` is filled only when a kernel is loaded on a GPU, so registers and
spills are read from ptxas's own log (``knobs.nvidia.dump_ptxas_log``, with
``knobs.compilation.always_compile`` so that no cached cubin skips ptxas).  Shared memory is
checked against the target's per-block limit, which Triton only checks at load time.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
from typing import NamedTuple

from triton import knobs
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from .capture import Specialization, stand_in

# Dynamic shared memory one block may opt in to, in bytes (CUDA programming guide, table of
# compute capabilities): 227 KB on sm_90, 163 KB on sm_80.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}

_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


class Build(NamedTuple):
    """What compiling one specialization gave (``error`` empty when it compiled)."""

    arch: int
    kernel: str  # the function's name
    tuned: bool  # autotuned: config is one of its candidates
    measured: bool  # the first candidate: the configuration measured on an H100
    dtype: str  # element type of its first pointer argument
    config: str  # BLOCK_* constexprs, warps and stages
    flags: str  # the other constexprs
    case: str  # the first launch sequence that produced it
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    error: str

    @property
    def spills(self) -> int:
        return max(self.spill_stores, self.spill_loads)

    @property
    def shared_limit(self) -> int:
        return SHARED_LIMIT[self.arch]

    @property
    def ok(self) -> bool:
        """Compiled, and fits the target's shared memory."""
        return not self.error and self.shared <= self.shared_limit


def jit_function(name: str) -> tuple[JITFunction, bool]:
    """The ``@triton.jit`` function ``module.name`` (through any wrapper around it), and
    whether it is autotuned."""
    module, _, attr = name.rpartition(".")
    fn = getattr(importlib.import_module(module), attr)
    tuned = isinstance(fn, Autotuner)
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn, tuned


def describe(fn: JITFunction, data: str) -> tuple[str, str, str, str]:
    """``(kernel, dtype, config, flags)`` of ``fn``'s serialized specialization ``data``."""
    spec = json.loads(data)
    declared = [p.name for p in fn.params if p.is_constexpr]
    names = list(spec["signature"])
    values = {names[path[0]]: value for path, value in zip(spec["constant_keys"], spec["constant_vals"])}
    blocks = [f"{k}={values[k]}" for k in declared if k.startswith("BLOCK")]
    options = spec["options"]
    config = " ".join(blocks + [f"w{options['num_warps']}", f"s{options['num_stages']}"])
    flags = " ".join(f"{k}={values[k]}" for k in declared if not k.startswith("BLOCK"))
    dtype = next((t[1:] for t in spec["signature"].values() if isinstance(t, str) and t.startswith("*")), "")
    return fn.__name__, dtype, config, flags


def _ptxas_numbers(log: str) -> dict[str, int]:
    numbers = {}
    for field, pattern in _PTXAS.items():
        found = pattern.findall(log)
        if not found:
            raise RuntimeError(f"no {field!r} in the ptxas log:\n{log[-2000:]}")
        numbers[field] = max(int(x) for x in found)
    return numbers


def build(spec: Specialization) -> Build:
    """Compile ``spec`` for ``sm_<spec.arch>`` (ptxas included) and read its resources."""
    fn, tuned = jit_function(spec.kernel)
    kernel, dtype, config, flags = describe(fn, spec.data)
    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), stand_in(spec.arch):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(log):
                compiled = fn.preload(spec.data)
        except Exception as error:  # a compile error is a result: reported, and the check fails
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            return Build(spec.arch, kernel, tuned, spec.measured, dtype, config, flags, spec.case, 0, 0, 0, 0, 0,
                         f"{type(error).__name__}: {first}"[:300])
    numbers = _ptxas_numbers(log.getvalue())
    return Build(spec.arch, kernel, tuned, spec.measured, dtype, config, flags, spec.case, numbers["registers"],
                 numbers["spill_stores"], numbers["spill_loads"], numbers["stack"], compiled.metadata.shared, "")
