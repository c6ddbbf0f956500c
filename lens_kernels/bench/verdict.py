"""The main command's report: a short table, one row per implementation, then PASS or FAIL
against the float64 reference with the tolerance used (``python -m lens_kernels``).

Every implementation's loss and gradient are checked against float64 on the very inputs that
are timed (:mod:`lens_kernels.bench.check`); one that fails the check is not timed.
"""
from __future__ import annotations

import textwrap

from .check import GRAD_RTOL, LOSS_TOL
from .problems import DTYPES
from .report import aligned, number

HEADER = ["implementation", "fwd ms", "fwd+bwd ms", "peak +MB", "loss err", "grad err", "check"]
WIDTH = 100  # columns of every line printed
CHECKS = {"ok": "PASS", "failed-check": "FAIL", "error": "FAIL", "oom": "out of memory", "skipped": "skipped"}


def _case(record: dict) -> str:
    return f"V={record['vocab']} N={record['tokens']} {record['dtype']} {record['policy']} {record['mode']}"


def _problem(record: dict) -> str:
    return (f"V={record['vocab']}, {record['batch']} rows x {record['length']} tokens (groups of "
            f"{record['group_size']}), {record['dtype']} logits, {record['policy']}-policy, mode {record['mode']}")


def table(records: list[dict]) -> str:
    """One row per (case, implementation); the case is named in the row only when there are several."""
    several = len({_case(r) for r in records}) > 1
    rows = []
    for r in records:
        name = f"{_case(r)} {r['impl']}" if several else r["impl"]
        timed = [number(r.get(k)) for k in ("fwd_median_ms", "fwdbwd_median_ms", "peak_extra_mb")]
        errors = [number(r.get("loss_error")), number(r.get("grad_relative_error"))]
        rows.append([name, *timed, *errors, CHECKS[r["status"]]])
    return aligned(HEADER, rows, 1)


def tolerance(records: list[dict]) -> str:
    dtypes = sorted({r["dtype"] for r in records}, key=list(DTYPES).index)
    grad = ", ".join(f"{GRAD_RTOL[DTYPES[d]]:g} ({d})" for d in dtypes)
    return f"tolerance: loss err <= {LOSS_TOL:g} x max(1, |loss|); grad err (max |err| / max |grad|) <= {grad}"


def report(records: list[dict], env: dict) -> tuple[str, bool]:
    """The text the main command prints, and whether every implementation that ran passed."""
    ran = [r for r in records if r["status"] not in ("skipped", "oom")]
    passed = bool(ran) and all(r["status"] == "ok" and r.get("check_passed") for r in ran)
    lines = [
        f"lens-kernels {env['lens_kernels']} ({env['git_commit'] or 'no git commit'}): "
        "the fused LENS loss against the float64 reference",
        f"device: {env['device']}, {env['torch_threads']} torch threads; torch {env['torch']}, "
        f"triton {env['triton']}",
    ]
    if len({_case(r) for r in records}) == 1:
        lines.append(f"problem: {_problem(records[0])}")
    lines += ["", table(records), "", tolerance(records)]
    lines += [textwrap.fill(f"- {r['impl']}: {r['status']}: {r['reason']}", WIDTH, subsequent_indent="  ")
              for r in records if r["status"] != "ok"]
    failed = len(ran) - sum(r["status"] == "ok" and bool(r.get("check_passed")) for r in ran)
    verdict = (f"PASS: {len(ran)} of {len(ran)} implementations match the float64 reference" if passed else
               f"FAIL: {failed} of {len(ran)} implementations do not match the float64 reference"
               if ran else "FAIL: no implementation ran")
    return "\n".join(lines + [verdict]), passed
