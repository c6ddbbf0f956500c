"""``python -m lens_kernels`` / ``lens-kernels``: a short table, one row per implementation, then
PASS or FAIL against the float64 reference with the tolerance used, and the exit status to match."""
from __future__ import annotations

import sys

import pytest
import torch

from lens_kernels import __main__ as main_module
from lens_kernels.bench import check

TINY = ["--device", "cpu", "--vocab", "1000", "--tokens", "64", "--group-size", "4", "--rows", "8",
        "--warmup", "1", "--min-runs", "2", "--max-runs", "2", "--budget", "0.01", "--copies", "2"]


def test_prints_a_narrow_table_and_pass(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main_module.main(TINY) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(map(len, lines)) <= 100, max(lines, key=len)
    assert f"torch {torch.__version__}" in out and "problem: V=1000, 8 rows x 8 tokens" in out
    rows = [line.split() for line in lines if line.startswith(("fused-", "reference-"))]
    assert [row[0] for row in rows] == ["fused-torch", "reference-eager"] and all(row[-1] == "PASS" for row in rows)
    assert "tolerance: loss err <= 0.0001 x max(1, |loss|); grad err (max |err| / max |grad|) <= 0.0001 (fp32)" in out
    assert "PASS: 2 of 2 implementations match the float64 reference" in out
    assert not (tmp_path / "benchmarks").exists(), "the check writes no files unless asked"


def test_a_check_that_fails_prints_fail_and_exits_1(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(check.GRAD_RTOL, torch.float32, 0.0)  # no gradient is exact: every row fails
    assert main_module.main(TINY + ["--impl", "fused-torch"]) == 1
    out = capsys.readouterr().out
    assert "grad err (max |err| / max |grad|) <= 0 (fp32)" in out
    assert "FAIL: 1 of 1 implementations do not match the float64 reference" in out
    assert "fused-torch: failed-check: not timed" in out


@pytest.mark.parametrize("argv0,usage", [("/venv/bin/lens-kernels", "usage: lens-kernels"),
                                         ("/site/lens_kernels/__main__.py", "usage: python -m lens_kernels")])
def test_help_names_the_command_as_it_was_called(argv0, usage, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    with pytest.raises(SystemExit):
        main_module.main()
    assert capsys.readouterr().out.startswith(usage + " ")


def test_list_fits_100_columns(capsys):
    assert main_module.main(["--list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "fused-torch" in out and "runs here" in out and max(map(len, out.splitlines())) <= 100
