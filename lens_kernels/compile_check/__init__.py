"""The Triton kernels compiled for real GPU targets on a machine without a GPU.

``python -m lens_kernels.compile_check`` runs the backend's launch sequences at production
shapes on ``meta`` tensors (``launches``), records the specialization of every kernel launch
(and of every autotune candidate) that a stand-in ``sm_90`` / ``sm_80`` driver gives
(``capture``), compiles each distinct one to a cubin with the installed Triton and its ptxas
(``build``), and fails on a compile error, shared memory over the target's limit, or a spill
on ``sm_90`` outside the measured configurations (``report.problems``); it prints registers,
spills and shared memory per kernel and per autotune candidate (``report.tables``).

Run it in a process without ``TRITON_INTERPRET`` (the interpreter replaces the kernels'
compiler); ``tests/test_compile_targets.py`` does so in a subprocess.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from typing import Sequence

from .build import Build, build, describe, jit_function
from .capture import Specialization, record_launches
from .launches import production

TARGETS = (90, 80)


def _require_compiler() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_check: unset TRITON_INTERPRET before triton is imported (the interpreter "
                           "replaces the compiler)")


def specializations(archs: Sequence[int], full: bool) -> list[Specialization]:
    """The specializations of :func:`launches.production` for each of ``archs``: every
    distinct one (``full``), or the first of each kernel, dtype, configuration and set of
    constexpr switches (those differing only in the divisibility of an argument left out)."""
    _require_compiler()
    specs = [spec for arch in archs for spec in record_launches(arch, production(full))]
    if full:
        return specs
    kept: dict[tuple, Specialization] = {}
    for spec in specs:
        kept.setdefault((spec.arch, describe(jit_function(spec.kernel)[0], spec.data)), spec)
    return list(kept.values())


def compile_all(specs: Sequence[Specialization], jobs: int = 1) -> list[Build]:
    """:func:`build` of every specialization, in ``jobs`` processes (spawned: no fork of a
    process that has imported torch and triton)."""
    _require_compiler()
    if jobs <= 1:
        return [build(spec) for spec in specs]
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(build, specs))


__all__ = ["TARGETS", "Build", "Specialization", "specializations", "compile_all"]
