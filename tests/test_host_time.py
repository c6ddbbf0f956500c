"""The host-time benchmark (``lens_kernels.bench.host_time``) through the stand-in H100, and the
fast launch path (``backends.common.launch``) against Triton's own.

One subprocess (the stand-in replaces Triton's driver for good, and needs Triton without its
interpreter): it runs the benchmark on a tiny shape, then runs one forward+backward of every
case through ``kernel[grid](...)``, then twice through ``launch``'s fast path (first bound by
Triton's binder, then from the kept plan), recording what reaches Triton's C launcher.  No
timing is asserted.  Needs gcc and Triton's ptxas: it compiles the kernels for sm_90 (~15 s of
CPU on a cold Triton cache, a few seconds warm).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    from lens_kernels.bench import host_time
    from lens_kernels.backends.common import launch as fast

    host_time.main(sys.argv[2:])  # activates the stand-in H100
    from triton.backends.nvidia.driver import CudaLauncher

    records, hooks, taken = [], [], []
    real_call, real_plan = CudaLauncher.__call__, fast._plan

    def describe(arg):
        if isinstance(arg, torch.Tensor):
            return (str(arg.dtype), tuple(arg.shape), arg.stride(), arg.data_ptr() % 16)
        return repr(arg)

    def record(self, gx, gy, gz, stream, function, packed, metadata, enter, exit_, *args):
        records.append([id(self), gx, gy, gz, stream, repr(packed), [describe(a) for a in args]])
        hooks.append((enter is None or not enter.calls) and (exit_ is None or not exit_.calls))
        return real_call(self, gx, gy, gz, stream, function, packed, metadata, enter, exit_, *args)

    def plan(*args):
        found = real_plan(*args)
        taken.append(found is not None)
        return found

    CudaLauncher.__call__, fast._plan = record, plan
    report = {}
    for backend, mode, policy in host_time.CASES:
        for misaligned in (False, True):
            inputs = host_time.make_inputs(4, 8, 1000, 2, policy)
            if misaligned:  # 4-byte offset: another specialization than the aligned tensor's
                inputs["rewards"] = torch.rand(5)[1:]
            step = host_time.make_step(inputs, backend, mode)
            runs = {}
            # Triton's path (compiles), then the fast one: bound by Triton's binder, then planned
            for path, flag in (("triton", False), ("bound", True), ("planned", True)):
                fast._FAST = flag
                records.clear(); taken.clear()
                step()
                runs[path] = (list(records), list(taken))
            report[f"{backend} {mode} {policy} misaligned={misaligned}"] = runs
    report["hooks_empty"] = all(hooks)
    with open(sys.argv[1], "w") as out:
        json.dump(report, out)
''')


@pytest.fixture(scope="module")
def stand_in_run(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found: the stand-in GPU builds a stub libcuda")
    out = tmp_path_factory.mktemp("host_time")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["--batch", "4", "--length", "8", "--vocab", "1000", "--group-size", "2", "--calls", "3", "--repeats", "1",
            "--warmup", "1", "--profile-calls", "2", "--label", "tiny", "--save", str(out / "host.json")]
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(out / "launches.json"), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "host.json").read_text())["tiny"], json.loads((out / "launches.json").read_text()), out


def test_benchmark_reports_every_case_through_sm90_kernels(stand_in_run):
    run, _, out = stand_in_run
    cases = {(r["backend"], r["mode"], r["policy"]): r for r in run["results"]}
    assert len(cases) == 8
    assert set(run["compiled"]) >= {"_calibrate_kernel", "_finalize_kernel", "_fused_loss_kernel", "_scale_rows_kernel"}
    assert all(targets == ["cuda:90"] for targets in run["compiled"].values())
    for (backend, mode, policy), r in cases.items():
        assert r["cpu"]["median_us"] > 0 and len(r["wall"]["repeat_medians_us"]) == 1
        # README: a forward+backward with check_values=False issues at most 6 device operations
        assert 4 <= r["launches"] <= 6, (backend, mode, policy, r["kernels"])
        two_pass = mode == "lens" and policy == "on"
        fused = "lk_fused_loss" if backend == "cuda" else "_fused_loss_kernel"
        assert (fused in r["kernels"]) != two_pass
    assert set(run["profiles"]) == {"triton grpo off-policy", "triton lens on-policy"}
    assert "ncalls" in run["profiles"]["triton grpo off-policy"]
    assert "| triton | grpo | off |" in (out / "host.md").read_text()


def test_fast_launch_hands_triton_the_same_kernel_and_arguments(stand_in_run):
    _, launches, _ = stand_in_run
    assert launches.pop("hooks_empty")  # so passing no hooks and no launch metadata changes nothing
    for case, runs in launches.items():
        (triton_path, _), (bound, bound_taken), (planned, planned_taken) = (
            runs["triton"], runs["bound"], runs["planned"])
        assert bound == triton_path and planned == triton_path, case
        assert bound_taken and all(bound_taken) and all(planned_taken), case
        if case.endswith("misaligned=True"):  # the calibration reads rewards: another compiled variant
            aligned = launches[case.replace("True", "False")]["triton"][0]
            assert {r[0] for r in triton_path} != {r[0] for r in aligned}, case
