"""The comparison table, the plot (one curve per mode on shared axes) and the results file of a
run: ``lens-train --results-json PATH`` writes the command, the machine, the versions, the
commit, the wall time with the load average around it, the options and every metric record,
from which ``scripts/render_docs.py`` renders the tables of the documentation."""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Sequence

Records = Sequence[dict]
VERSIONED = ("torch", "transformers", "numpy", "math-verify", "tokenizers", "lens-kernels")


def _window_mean(records: Records, key: str, after: int, upto: int) -> float | None:
    values = [r[key] for r in records if after < r["step"] <= upto and key in r]
    return sum(values) / len(values) if values else None


def _fmt(value) -> str:
    return "  -  " if value is None else f"{value:5.3f}"


def comparison_table(results: dict[str, Records], ks: Sequence[int]) -> str:
    """One row per evaluation step: per mode, the training accuracy and negative-group
    fraction averaged over the steps since the previous row, then eval pass@1, pass@kmax and
    the hard subset's pass@1."""
    kmax = max(ks)
    modes = list(results)
    eval_steps = sorted({r["step"] for recs in results.values() for r in recs if "eval/pass@1" in r})
    columns = ["train acc", "neg grp", "pass@1", f"pass@{kmax}", "hard p@1"]
    head = "| step | " + " | ".join(f"{m} {c}" for m in modes for c in columns) + " |"
    rule = "|" + "---:|" * (1 + len(modes) * len(columns))
    lines = [head, rule]
    previous = -1
    for step in eval_steps:
        cells = [str(step)]
        for mode in modes:
            recs = results[mode]
            at = next((r for r in recs if r["step"] == step), {})
            cells += [
                _fmt(_window_mean(recs, "accuracy", previous, step)),
                _fmt(_window_mean(recs, "negative_group_fraction", previous, step)),
                _fmt(at.get("eval/pass@1")),
                _fmt(at.get(f"eval/pass@{kmax}")),
                _fmt(at.get("eval/hard/pass@1")),
            ]
        lines.append("| " + " | ".join(cells) + " |")
        previous = step
    return "\n".join(lines)


def _smooth(values: list[float], width: int) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - width + 1) : i + 1]
        out.append(sum(window) / len(window))
    return out


def plot_curves(results: dict[str, Records], path: Path, title: str = "") -> Path:
    """Training accuracy, negative-group fraction and eval pass@1 (all / hard) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (mode, recs) in enumerate(results.items()):
        color = f"C{i}"
        train = [r for r in recs if "accuracy" in r]
        steps = [r["step"] for r in train]
        for ax, key in zip(axes[:2], ("accuracy", "negative_group_fraction")):
            values = [r[key] for r in train]
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _smooth(values, 5), color=color, label=f"{mode} (5-step mean)")
        evals = [r for r in recs if "eval/pass@1" in r]
        axes[2].plot([r["step"] for r in evals], [r["eval/pass@1"] for r in evals], "o-",
                     color=color, label=f"{mode} all")
        if any("eval/hard/pass@1" in r for r in evals):
            axes[2].plot([r["step"] for r in evals], [r.get("eval/hard/pass@1") for r in evals],
                         "s--", color=color, label=f"{mode} levels 4-5")
    for ax, label in zip(axes, ("training accuracy", "negative-group fraction", "eval pass@1")):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def results_document(command: str, config, results: dict[str, Records], wall_s: float,
                     load_at_start: list[float] | None) -> dict:
    """What ``--results-json`` writes: provenance, timing, options and each mode's records."""
    import torch

    from ..bench.report import _version, cpu_model, git_commit

    return {
        "command": command,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if config.device != "cpu" and torch.cuda.is_available()
        else f"{cpu_model()} ({os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), **{name: _version(name) for name in VERSIONED}},
        "git_commit": git_commit(),
        "wall_s": wall_s,
        "load_average": {"start": load_at_start, "end": load_average()},
        "options": config.to_dict(),
        "records": {mode: list(records) for mode, records in results.items()},
    }


def write_results(path: Path, document: dict) -> Path:
    """One line per record, so that the file diffs and reads well."""
    head = {k: v for k, v in document.items() if k != "records"}
    lines = json.dumps(head, indent=1)[:-2] + ',\n "records": {\n'
    modes = list(document["records"].items())
    for i, (mode, records) in enumerate(modes):
        body = ",\n".join("  " + json.dumps(r) for r in records)
        lines += f"  {json.dumps(mode)}: [\n{body}\n  ]" + (",\n" if i + 1 < len(modes) else "\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(lines + " }\n}\n", encoding="utf-8")
    return path
