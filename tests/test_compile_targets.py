"""Every Triton kernel of the package compiles for an H100 (sm_90) and an A100 (sm_80), without
a GPU, at the specializations its launchers produce at production shapes (issue 19, item 1).

``python -m lens_kernels.compile_check`` runs in a subprocess (the other tests run Triton's
interpreter, which replaces the compiler): the launch sequences of the Triton backend on
``meta`` tensors at ``N = 16384``, ``V = 151936``, ``d = 4096`` in bf16, fp16 and fp32, every
loss case and every autotune candidate, each distinct specialization compiled by the installed
Triton and its ptxas.  It fails on a compile error, on shared memory over the target's
per-block limit, and on any register spill on sm_90 (the autotune candidates are kept for an
H100) but in the configuration measured there, the first of each list (reported, as are the
spills on sm_80).  ``pytest -s`` prints registers, spills and shared memory
per kernel and per candidate.

``LENS_KERNELS_COMPILE_FULL=1`` checks every shape of the issue instead (odd ``N`` and ``V``,
``V = 128256``, ``d = 2048``, with and without a bias): several times the specializations and
the time, so not in CI.  The tables of a full run are in benchmarks/results/compile-sm90-sm80.md.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from lens_kernels.compile_check.build import Build  # noqa: E402
from lens_kernels.compile_check.report import load, problems  # noqa: E402

FULL = os.environ.get("LENS_KERNELS_COMPILE_FULL", "0") not in ("", "0")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
TIMEOUT_S = 3600 if FULL else 900


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[list[Build], str]:
    """The builds of one compile-check run, and what it printed."""
    if not (PTXAS.is_file() or os.environ.get("TRITON_PTXAS_PATH")):
        pytest.skip(f"no ptxas: Triton ships one at {PTXAS}, and TRITON_PTXAS_PATH is not set")
    stem = tmp_path_factory.mktemp("compile") / "builds"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LENS_KERNELS_AUTOTUNE")}
    command = [sys.executable, "-m", "lens_kernels.compile_check", "--jobs", "2", "--save", str(stem)]
    run = subprocess.run(command + (["--full"] if FULL else []), env=env, capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    if not Path(f"{stem}.json").exists():
        pytest.fail(f"the compile check wrote nothing (exit {run.returncode}):\n{run.stdout[-3000:]}"
                    f"{run.stderr[-3000:]}")
    print(run.stdout)
    builds = load(f"{stem}.json")
    return builds, run.stdout


def test_every_kernel_compiles_fits_shared_memory_and_does_not_spill_on_sm90_unless_measured(compiled):
    builds, _ = compiled
    assert {b.arch for b in builds} == {90, 80}
    found = problems(builds)
    assert not found, "\n".join(found)


def test_every_kernel_of_the_package_is_compiled_for_both_targets(compiled):
    """A kernel that no launch sequence reaches would go unchecked: every ``*_kernel`` Triton
    function in the package must be among the builds of both targets."""
    builds, _ = compiled
    root = Path(__file__).parents[1] / "lens_kernels"
    defined = set()
    for path in root.rglob("*.py"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("@triton.jit"):
                name = next(l for l in lines[i + 1:] if l.startswith("def ")).split("(")[0][4:]
                if name.endswith("_kernel"):
                    defined.add(name)
    assert len(defined) >= 13, defined
    for arch in (90, 80):
        assert {b.kernel for b in builds if b.arch == arch} == defined, arch


# the candidate list (``linear_tile.gpu_configs()``) each autotuned kernel draws from
FAMILIES = {"_partials_kernel": "logits", "_dz_kernel": "logits", "_block_logits_kernel": "logits",
            "_dh_kernel": "dh", "_dw_kernel": "dw"}


def _is(config, label: str) -> bool:
    words = label.split()
    values = dict(w.split("=") for w in words if "=" in w)
    return (all(values.get(k) == str(v) for k, v in config.kwargs.items())
            and f"w{config.num_warps}" in words and f"s{config.num_stages}" in words)


def test_every_autotuned_kernel_is_compiled_with_each_of_its_candidates(compiled):
    """Each autotuned kernel, for each dtype and target, is compiled with exactly the
    candidates of its family and element size in ``linear_tile.gpu_configs()``."""
    from lens_kernels.backends.triton.linear_tile import gpu_configs

    builds, _ = compiled
    assert {b.kernel for b in builds if b.tuned} == set(FAMILIES)
    candidates = gpu_configs()
    for (kernel, family), (dtype, size), arch in itertools.product(
            FAMILIES.items(), (("bf16", 2), ("fp16", 2), ("fp32", 4)), (90, 80)):
        labels = {b.config for b in builds if (b.arch, b.kernel, b.dtype) == (arch, kernel, dtype)}
        expected = candidates[family][size]
        assert len(labels) == len(expected), (arch, kernel, dtype, labels)
        assert all(any(_is(c, label) for label in labels) for c in expected), (arch, kernel, dtype, labels)


def _build(arch=90, registers=128, spill=0, shared=0, error="", measured=False) -> Build:
    return Build(arch, "_k", True, measured, "bf16", "BLOCK_N=128 w8 s3", "", "case", registers, spill, spill, spill,
                 shared, error)


@pytest.mark.parametrize("build, failing", [
    pytest.param(_build(), False, id="clean"),
    pytest.param(_build(registers=255, spill=60), True, id="spill-on-sm90"),
    pytest.param(_build(arch=80, registers=255, spill=396), False, id="spill-on-sm80-reported-only"),
    pytest.param(_build(registers=168, spill=24, measured=True), False, id="measured-config-spill-reported-only"),
    pytest.param(_build(shared=227 * 1024 + 1), True, id="shared-over-sm90-limit"),
    pytest.param(_build(arch=80, shared=163 * 1024 + 1), True, id="shared-over-sm80-limit"),
    pytest.param(_build(error="PTXASError: ptxas failed"), True, id="compile-error"),
])
def test_problems_names_what_fails_the_check(build, failing):
    found = problems([build])
    assert bool(found) == failing
    if failing:
        assert "sm_" in found[0] and "_k" in found[0]
