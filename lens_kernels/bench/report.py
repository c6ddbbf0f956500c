"""What a benchmark run writes: the environment, a table (terminal and markdown), JSON, a plot,
and the compact summary of one or more runs (``lens-bench --summarize``)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch

import lens_kernels

# Environment variables that change what is measured (threads, allocators, interpreters).
ENV_PREFIXES = ("OMP_", "MKL_", "MALLOC_", "LD_PRELOAD", "TRITON_", "PYTORCH_", "CUDA_", "TORCH")
COLUMNS = ("shape", "policy", "mode", "impl", "fwd ms", "fwd+bwd ms", "host ms", "x 2-pass floor",
           "x 1-pass floor", "peak +MB", "peak-grad MB", "loss err", "grad err (rel)")
LABELS = 4  # left-aligned label columns


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _run(command: list[str], cwd: Optional[Path] = None) -> Optional[str]:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """File-name stem of the device: ``nvidia-h100-80gb-hbm3``, ``cpu-amd-epyc-2c``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu {cpu_model()} {os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> Optional[str]:
    """The short commit of the lens_kernels being run, ``-dirty`` with uncommitted changes; None
    outside a git checkout."""
    repo = Path(lens_kernels.__file__).resolve().parent.parent
    commit = _run(["git", "rev-parse", "--short", "HEAD"], repo)
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], repo)
    return None if commit is None else commit + ("-dirty" if dirty else "")


def environment(device: torch.device, command: str, bandwidth: float, timer) -> dict:
    return dict(
        command=command,
        date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        device=device_name(device),
        device_type=device.type,
        torch=torch.__version__,
        triton=_version("triton"),
        cuda_runtime=torch.version.cuda,
        driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if device.type == "cuda" else None,
        liger_kernel=_version("liger-kernel"),
        lens_kernels=lens_kernels.__version__,
        git_commit=git_commit(),
        python=platform.python_version(),
        host_cpu=cpu_model(),
        torch_threads=torch.get_num_threads(),
        environment_variables={k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
        load_average=[round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        copy_bandwidth_gbps=bandwidth / 1e9,
        timing=dict(warmup=timer.warmup, min_runs=timer.min_runs, max_runs=timer.max_runs, budget_s=timer.budget_s,
                    clock="CUDA events" if device.type == "cuda" else "time.perf_counter"),
    )


def number(value) -> str:
    """A table cell: 3 significant digits, whole numbers from 100, exponents outside [1e-2, 1e6)."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) < 1e-2 or abs(value) >= 1e6:
        return f"{value:.1e}"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def table_rows(records: list[dict]) -> list[list[str]]:
    """One row per implementation that ran (skipped ones are listed in the notes)."""
    rows = []
    for r in records:
        labels = [f"V={r['vocab']} N={r['tokens']} {r['dtype']}", r["policy"], r["mode"], r["impl"]]
        if r["status"] == "skipped":
            continue
        if r["status"] != "ok":
            note = {"failed-check": "FAILED CHECK", "oom": "out of memory", "error": "error"}[r["status"]]
            errors = [number(r.get("loss_error")), number(r.get("grad_relative_error"))]
            rows.append([*labels, note, *["-"] * 6, *errors])
            continue
        rows.append([
            *labels, number(r["fwd_median_ms"]), number(r["fwdbwd_median_ms"]), number(r["host_fwdbwd_median_ms"]),
            number(r["x_floor_2pass"]), number(r["x_floor_1pass"]), number(r["peak_extra_mb"]),
            number(r["peak_extra_minus_grad_mb"]), number(r["loss_error"]), number(r["grad_relative_error"]),
        ])
    return rows


def aligned(header: list[str], rows: list[list[str]], labels: int) -> str:
    """A plain-text table: the first ``labels`` columns left-aligned, the rest right-aligned."""
    rows = [header] + rows
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < labels else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def text_table(records: list[dict]) -> str:
    return aligned(list(COLUMNS), table_rows(records), LABELS)


def markdown_table(records: list[dict]) -> str:
    rule = "|".join("---" if i < LABELS else "---:" for i in range(len(COLUMNS)))
    head = "| " + " | ".join(COLUMNS) + " |\n|" + rule + "|"
    return "\n".join([head] + ["| " + " | ".join(row) + " |" for row in table_rows(records)])


def notes(records: list[dict], computes: dict[str, str]) -> list[str]:
    """Why rows were not run, and what each implementation computes."""
    lines = []
    reasons = sorted({(r["impl"], r["mode"], r["status"], r["reason"]) for r in records if r["status"] != "ok"})
    for impl, mode, status, reason in reasons:
        lines.append(f"- {impl} ({mode}): {status}: {reason}")
    return lines + [f"- **{name}**: {text}" for name, text in computes.items()]


def targets_lines(results: list[dict]) -> list[str]:
    """One line per target: its worst measured value, where, and the verdict."""
    lines = []
    for t in results:
        bound = "<=" if t["at_most"] else ">="
        value = "-" if t["value"] is None else f"{t['value']:.3g} at {t['worst_at']}"
        lines.append(f"- {t['label']} {t['target']}: {value} (want {bound} {t['limit']:g}): **{t['verdict']}**")
    return lines


def legend(env: dict) -> list[str]:
    return [
        f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda_runtime']}, "
        f"driver {env['driver']}, liger-kernel {env['liger_kernel']}, lens-kernels {env['lens_kernels']} "
        f"({env['git_commit']}); {env['torch_threads']} torch threads, load average {env['load_average']}"
        f"{', env ' + str(env['environment_variables']) if env['environment_variables'] else ''}.",
        f"Copy bandwidth {env['copy_bandwidth_gbps']:.1f} GB/s (measured in this run). Floors count the "
        "completion mask: two-pass = (2 x live rows read + all rows of the gradient written) x V x itemsize / "
        "bandwidth, one-pass = (live rows read once + gradient written) / bandwidth; x floor = fwd+bwd time / "
        "floor.",
        f"Times: median of many runs after warm-up ({env['timing']['clock']}), inputs rotated among copies; forward "
        "runs with autograd recording. host ms: how long a fwd+bwd blocks the Python thread (host clock from an "
        "idle device to the call's return, before any synchronize; on the CPU the fwd+bwd time). policy on: "
        "old log-probs = the current ones; off: given, the policy's log-probs plus N(0, 0.15^2) noise (clip "
        "fraction in the JSON). peak +MB: allocated above the inputs during fwd+bwd, the returned gradient "
        "included; peak-grad MB: the same minus the gradient. Errors against the float64 reference on the "
        "timed inputs: loss absolute, gradient max abs / max |grad|.",
    ]


def markdown(records: list[dict], env: dict, computes: dict[str, str], targets: list[dict],
             plot: Optional[str] = None) -> str:
    parts = [f"# lens-kernels benchmark: {env['device']}", "", f"Command: `{env['command']}` ({env['date_utc']})", ""]
    parts += legend(env) + ["", markdown_table(records), ""]
    if plot:
        parts += [f"![time and memory against N]({plot})", ""]
    if targets:
        parts += ["## Targets", ""] + targets_lines(targets) + [""]
    parts += ["## Notes", ""] + notes(records, computes)
    return "\n".join(parts) + "\n"


def terminal(records: list[dict], env: dict, computes: dict[str, str], targets: list[dict]) -> str:
    parts = legend(env) + ["", text_table(records)]
    if targets:
        parts += ["", "Targets:"] + targets_lines(targets)
    parts += ["", "Notes:"] + notes(records, computes)
    return "\n".join(parts).replace("**", "")


def write(out_dir: Path, stem: str, records: list[dict], env: dict, computes: dict[str, str],
          targets: list[dict], plot: Optional[str] = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    payload = dict(environment=env, implementations=computes, targets=targets, results=records)
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    md_path.write_text(markdown(records, env, computes, targets, plot))
    return [json_path, md_path]
