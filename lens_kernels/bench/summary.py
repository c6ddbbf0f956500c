"""The compact summary of one or more runs (``lens-bench --summarize A.json B.json``).

One line per (shape, policy, mode): the two floors, then ``fwd+bwd ms / host ms`` of each
implementation (Liger's two rows share one column: ``liger-grpo`` in grpo mode, ``liger-lens``
in lens mode), then the targets evaluated over all the runs' records together.  Where two runs
measured the same case, the first file given wins.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import targets
from .report import aligned, number, targets_lines

ORDER = ("fused-triton", "fused-cuda", "fused-torch", "liger", "reference-compiled", "reference-eager")
SHORT = {"fused-triton": "triton", "fused-cuda": "cuda", "fused-torch": "torch", "liger": "liger",
         "reference-compiled": "compiled", "reference-eager": "eager"}
STATUS = {"failed-check": "FAIL", "oom": "oom", "error": "error", "skipped": "-"}


def _column(impl: str) -> str:
    return "liger" if impl in targets.LIGER.values() else impl


def _cell(record: dict) -> str:
    if record["status"] != "ok":
        return STATUS[record["status"]]
    return f"{number(record['fwdbwd_median_ms'])}/{number(record['host_fwdbwd_median_ms'])}"


def compact(records: list[dict]) -> str:
    """The pivot table: floors and ``fwd+bwd/host`` ms per implementation, per case."""
    ok = [r for r in records if r["status"] == "ok"]
    columns = [c for c in ORDER if any(_column(r["impl"]) == c for r in records)]
    columns += sorted({_column(r["impl"]) for r in records} - set(columns))
    cases: dict = {}
    for r in records:
        key = (r["dtype"], r["vocab"], r["tokens"], r["policy"], r["mode"])
        row = cases.setdefault(key, {})
        row.setdefault(_column(r["impl"]), r)
    rows = []
    for (dtype, vocab, tokens, policy, mode), row in cases.items():
        floor = next((r for r in ok if (r["dtype"], r["vocab"], r["tokens"], r["policy"]) ==
                      (dtype, vocab, tokens, policy)), None)
        floors = "-" if floor is None else f"{number(floor['floor_1pass_ms'])}/{number(floor['floor_2pass_ms'])}"
        cells = [_cell(row[c]) if c in row else "" for c in columns]
        rows.append([f"V={vocab} N={tokens} {dtype}", policy, mode, floors, *cells])
    header = ["shape", "policy", "mode", "floor 1p/2p", *[SHORT.get(c, c) for c in columns]]
    return aligned(header, rows, 3)


def load(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """``(environments, records)`` of the JSON files, records of earlier files first."""
    envs, records = [], []
    for path in paths:
        payload = json.loads(Path(path).read_text())
        envs.append(payload["environment"])
        records += payload["results"]
    return envs, records


def summarize(paths: list[Path]) -> str:
    """The header (device, versions, commands), the compact table and the targets."""
    envs, records = load(paths)
    if not envs:
        return "no results"
    env = envs[0]
    head = [
        f"{env['device']}: torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda_runtime']}, "
        f"liger-kernel {env['liger_kernel']}, lens-kernels {env['lens_kernels']} ({env['git_commit']}), "
        f"copy bandwidth {env['copy_bandwidth_gbps']:.0f} GB/s",
        *[f"command: {e['command']} ({e['date_utc']})" for e in envs],
        "cells: fwd+bwd ms / host ms (median); floors in ms; liger = liger-grpo (grpo) or liger-lens (lens)",
    ]
    verdicts = targets.evaluate(records, env["device_type"])
    lines = head + ["", compact(records)]
    if verdicts:
        lines += ["", "Targets (worst case over what was measured):"] + targets_lines(verdicts)
    return "\n".join(lines).replace("**", "")
