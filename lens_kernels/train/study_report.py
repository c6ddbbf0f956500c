"""The study's outputs: ``study-DIFFICULTY.json`` (every finished run's summary and curves, the
per-mode intervals and the paired differences), ``.md`` (the tables) and ``.png`` (the curves
with 95% bands across seeds, the mechanism, the per-level differences)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

from .config import TrainConfig
from .metrics import read_metrics
from .stats import mean_ci, verdict
from .study_summary import BASELINE, aggregate, run_curves, run_summary
from .study_worker import is_done

OMITTED_OPTIONS = ("seed", "run_dir", "modes", "progress")


def collect(study_dir: Path, seeds: Sequence[int], modes: Sequence[str],
            steps: int, kmax: int) -> dict[str, dict[int, dict]]:
    """``{mode: {seed: {"summary", "curves"}}}`` of the finished runs."""
    runs: dict[str, dict[int, dict]] = {mode: {} for mode in modes}
    for seed in seeds:
        seed_dir = study_dir / f"seed_{seed}"
        for mode in modes:
            if is_done(seed_dir, mode, steps):
                records = read_metrics(seed_dir / mode / "metrics.jsonl")
                runs[mode][seed] = {"summary": run_summary(records, kmax),
                                    "curves": run_curves(records, kmax)}
    return runs


def write_report(study_dir: Path, seeds: Sequence[int], modes: Sequence[str],
                 config: TrainConfig, difficulty: str, report_dir: Path) -> list[Path]:
    """Write the JSON, markdown and plot; returns their paths (no plot without finished runs)."""
    kmax = max(config.eval_ks)
    runs = collect(Path(study_dir), seeds, modes, config.steps, kmax)
    summary = aggregate({m: {s: r["summary"] for s, r in rs.items()} for m, rs in runs.items()})
    options = {k: v for k, v in config.to_dict().items() if k not in OMITTED_OPTIONS}
    data = {
        "difficulty": difficulty,
        "seeds_requested": list(seeds),
        "modes": list(modes),
        "finished": {mode: sorted(rs) for mode, rs in runs.items()},
        "options": options,
        "summary": summary,
        "runs": {mode: {str(s): r for s, r in sorted(rs.items())} for mode, rs in runs.items()},
    }
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    stem = report_dir / f"study-{difficulty}"
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(data, indent=1, default=_json_default) + "\n",
                         encoding="utf-8")
    md_path = stem.with_suffix(".md")
    md_path.write_text(markdown(data, stem.name + ".png"), encoding="utf-8")
    paths = [json_path, md_path]
    if any(runs.values()):
        paths.append(plot(data, stem.with_suffix(".png")))
    return paths


def _json_default(value):
    raise TypeError(f"not JSON serialisable: {value!r}")


def _num(value: Optional[float], signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _ci(stat: dict, signed: bool = False) -> str:
    text = _num(stat["mean"], signed)
    if stat["low"] is not None:
        text += f" [{_num(stat['low'], signed)}, {_num(stat['high'], signed)}]"
    return text


def markdown(data: dict, plot_name: str) -> str:
    """The report: settings, per-mode means with 95% intervals, paired differences."""
    modes, per_mode = data["modes"], data["summary"]["per_mode"]
    finished = ", ".join(f"{m}: {len(data['finished'][m])}" for m in modes)
    changed = {k: v for k, v in data["options"].items()
               if v != getattr(TrainConfig(), k, object())}
    lines = [
        f"# lens-study: {data['difficulty']} difficulty",
        "",
        f"Seeds requested: {len(data['seeds_requested'])}; runs finished per mode: {finished}. "
        f"Every mode of a seed starts from that seed's warm start with the same RL seed.",
        "",
        "Options that differ from the trainer's dataclass defaults (the same for every mode): "
        + ", ".join(f"`{k}={v}`" for k, v in changed.items()) + ".",
        "",
        "## Per mode: mean [95% t-interval] over seeds",
        "",
        "| metric | " + " | ".join(modes) + " |",
        "|---|" + "---:|" * len(modes),
    ]
    for metric, stats in per_mode.items():
        cells = [_ci(stats[m]) if m in stats else "-" for m in modes]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    for mode, result in data["summary"]["paired"].items():
        n = len(result["seeds"])
        lines += ["", f"## Paired: {mode} - {BASELINE}, per seed ({n} seeds)", ""]
        if n < 2:
            lines.append("Fewer than two seeds finished both modes: no paired statistics yet.")
            continue
        lines += [
            f"Mean difference [95% t-interval], two-sided sign-flip permutation p (with {n} "
            f"seeds the smallest possible p is {2 / 2 ** n:.3g}), seeds where {mode} is higher.",
            "",
            "| metric | difference [95% CI] | p | higher in | reading |",
            "|---|---:|---:|---:|---|",
        ]
        for metric, st in result.items():
            if metric == "seeds":
                continue
            reading = verdict(st["low"], st["high"], f"{mode} higher", f"{mode} lower")
            lines.append(f"| {metric} | {_ci(st, signed=True)} | {st['p_sign_flip']:.3f} | "
                         f"{st['wins']}/{st['n']} | {reading} |")
    lines += ["", f"![curves and mechanism]({plot_name})", ""]
    return "\n".join(lines)


def _band(ax, runs: dict, part: str, key: str, label: str, color: str) -> None:
    """Mean over seeds with a 95% t-band, at the steps every seed has."""
    curves = [r["curves"][part] for r in runs.values() if key in r["curves"][part]]
    if not curves:
        return
    length = min(len(c["step"]) for c in curves)
    steps = curves[0]["step"][:length]
    stats = [mean_ci([c[key][i] for c in curves]) for i in range(length)]
    ax.plot(steps, [s["mean"] for s in stats], color=color, label=label)
    if all(s["low"] is not None for s in stats):
        ax.fill_between(steps, [s["low"] for s in stats], [s["high"] for s in stats],
                        color=color, alpha=0.2, linewidth=0)


def plot(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [("eval", "pass@1", "eval pass@1"), ("eval", "hard/pass@1", "eval pass@1, levels 4-5"),
              ("train", "negative_group_fraction", "negative-group fraction"),
              ("train", "grad_share_negative_groups", "negative groups' share of the gradient"),
              ("train", "confidence_wrong_mean", "confidence (pibar) of wrong completions")]
    for i, mode in enumerate(data["modes"]):
        runs = data["runs"][mode]
        n = len(runs)
        for ax, (part, key, _) in zip(axes.flat, panels):
            _band(ax, runs, part, key, f"{mode} (n={n})", f"C{i}")
    for ax, (_, _, title) in zip(axes.flat, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _level_panel(axes.flat[5], data)
    fig.suptitle(f"lens-study, {data['difficulty']} difficulty: mean over seeds, 95% bands")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _level_panel(ax, data: dict) -> None:
    """Final pass@1 per level: each mode minus grpo, mean with its 95% interval."""
    paired = {m: r for m, r in data["summary"]["paired"].items()
              if any(k.startswith("final level ") for k in r)}
    ax.set_title("final pass@1 by level, difference to grpo (95% CI)", fontsize=10)
    if not paired:
        ax.text(0.5, 0.5, "needs two seeds of grpo and another mode", ha="center",
                transform=ax.transAxes)
        return
    for i, (mode, result) in enumerate(paired.items()):
        keys = sorted(k for k in result if k.startswith("final level "))
        x = [int(k.split()[2]) + 0.12 * (i - (len(paired) - 1) / 2) for k in keys]
        mean = [result[k]["mean"] for k in keys]
        err = [[m - result[k]["low"] for m, k in zip(mean, keys)],
               [result[k]["high"] - m for m, k in zip(mean, keys)]]
        color = f"C{data['modes'].index(mode)}"
        ax.errorbar(x, mean, yerr=err, fmt="o", color=color, capsize=3, label=f"{mode} - grpo")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("level")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
