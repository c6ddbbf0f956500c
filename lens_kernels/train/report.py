"""The comparison table and the plot of a run (one curve per mode on shared axes)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

Records = Sequence[dict]


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
