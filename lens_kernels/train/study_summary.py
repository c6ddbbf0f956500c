"""From each run's ``metrics.jsonl`` to the study's numbers: per-run summary metrics and curves,
then per-mode means with 95% intervals and paired differences against GRPO.

A run's summary metrics (one number per seed and mode):

- ``final pass@1``, ``final pass@K`` (K = the largest evaluated k), ``final hard pass@1``
  (levels 4-5): at the last evaluation;
- ``AUC pass@1``: the area under the pass@1 curve over the evaluation steps divided by their
  span, i.e. the mean pass@1 over training;
- ``final level L pass@1`` for every level;
- mechanism: ``negative-group grad share`` and ``negative-group fraction`` (means over the RL
  steps), ``negative-group fraction, first 10%`` (the start's difficulty),
  ``confidence wrong, change`` and ``confidence correct, change``: the mean pibar of incorrect /
  correct completions over the last tenth of the steps minus that over the first tenth.
"""
from __future__ import annotations

from typing import Sequence

from .stats import mean_ci, paired

BASELINE = "grpo"
MAIN_METRICS = ("final pass@1", "final pass@K", "final hard pass@1", "AUC pass@1")
MECHANISM_METRICS = (
    "negative-group grad share", "negative-group fraction", "negative-group fraction, first 10%",
    "confidence wrong, change", "confidence correct, change",
)
TRAIN_SERIES = ("accuracy", "negative_group_fraction", "grad_share_negative_groups",
                "confidence_wrong_mean", "confidence_correct_mean")
CURVE_WINDOW = 5  # steps averaged into one point of a stored training curve


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _series(records: Sequence[dict], key: str) -> list[float]:
    return [r[key] for r in records if isinstance(r.get(key), (int, float))]


def _change(values: Sequence[float]) -> float:
    w = max(1, len(values) // 10)
    return _mean(values[-w:]) - _mean(values[:w])


def run_summary(records: Sequence[dict], kmax: int) -> dict[str, float]:
    """The summary metrics of one run (see the module docstring)."""
    evals = [r for r in records if "eval/pass@1" in r]
    train = [r for r in records if "accuracy" in r]
    if len(evals) < 2 or not train:
        raise ValueError("records: expected at least two evaluations and one RL step")
    last = evals[-1]
    steps = [r["step"] for r in evals]
    p1 = [r["eval/pass@1"] for r in evals]
    area = sum((steps[i + 1] - steps[i]) * (p1[i + 1] + p1[i]) / 2 for i in range(len(steps) - 1))
    out = {
        "final pass@1": last["eval/pass@1"],
        f"final pass@{kmax}": last[f"eval/pass@{kmax}"],
        "final hard pass@1": last.get("eval/hard/pass@1", float("nan")),
        "AUC pass@1": area / (steps[-1] - steps[0]),
        "negative-group grad share": _mean(_series(train, "grad_share_negative_groups")),
        "negative-group fraction": _mean(_series(train, "negative_group_fraction")),
        "negative-group fraction, first 10%":
            _mean(_series(train, "negative_group_fraction")[: max(1, len(train) // 10)]),
        "confidence wrong, change": _change(_series(train, "confidence_wrong_mean")),
        "confidence correct, change": _change(_series(train, "confidence_correct_mean")),
    }
    for key in sorted(k for k in last if k.startswith("eval/level") and k.endswith("/pass@1")):
        level = key[len("eval/level"):-len("/pass@1")]
        out[f"final level {level} pass@1"] = last[key]
    return out


def run_curves(records: Sequence[dict], kmax: int) -> dict[str, dict[str, list]]:
    """Evaluation curves at every evaluation step; training curves as means over windows of
    ``CURVE_WINDOW`` steps (the window's last step is stored)."""
    evals = [r for r in records if "eval/pass@1" in r]
    eval_keys = ["eval/pass@1", f"eval/pass@{kmax}", "eval/hard/pass@1"] + sorted(
        k for k in evals[-1] if k.startswith("eval/level") and k.endswith("/pass@1"))
    out_eval = {"step": [r["step"] for r in evals]}
    for key in eval_keys:
        out_eval[key[len("eval/"):]] = [round(r.get(key, float("nan")), 4) for r in evals]
    train = [r for r in records if "accuracy" in r]
    windows = [train[i : i + CURVE_WINDOW] for i in range(0, len(train), CURVE_WINDOW)]
    level_keys = sorted(k for k in train[-1] if k.startswith("accuracy/level"))
    out_train = {"step": [w[-1]["step"] for w in windows]}
    for key in TRAIN_SERIES + tuple(level_keys):
        out_train[key] = [round(_mean(_series(w, key)), 4) for w in windows]
    return {"eval": out_eval, "train": out_train}


def aggregate(summaries: dict[str, dict[int, dict[str, float]]]) -> dict:
    """``summaries[mode][seed]`` -> ``{"per_mode": {metric: {mode: mean_ci}}, "paired":
    {mode: {metric: paired(mode - grpo)}}}``; pairs use the seeds both modes finished."""
    metrics = sorted({m for runs in summaries.values() for s in runs.values() for m in s},
                     key=_metric_order)
    per_mode: dict[str, dict] = {}
    for metric in metrics:
        per_mode[metric] = {}
        for mode, runs in summaries.items():
            values = [s[metric] for s in runs.values() if _ok(s.get(metric))]
            if values:
                per_mode[metric][mode] = mean_ci(values)
    out = {"per_mode": per_mode, "paired": {}}
    base = summaries.get(BASELINE, {})
    for mode, runs in summaries.items():
        if mode == BASELINE:
            continue
        seeds = sorted(set(runs) & set(base))
        out["paired"][mode] = {"seeds": seeds}
        if len(seeds) < 2:
            continue
        for metric in metrics:
            pairs = [(runs[s].get(metric), base[s].get(metric)) for s in seeds]
            pairs = [(a, b) for a, b in pairs if _ok(a) and _ok(b)]
            if len(pairs) >= 2:
                out["paired"][mode][metric] = paired([a for a, _ in pairs], [b for _, b in pairs])
    return out


def _ok(value) -> bool:
    return isinstance(value, (int, float)) and value == value


def _metric_order(metric: str) -> tuple:
    order = MAIN_METRICS + MECHANISM_METRICS
    if metric.startswith("final pass@") and metric != "final pass@1":
        metric_key = "final pass@K"
    else:
        metric_key = metric
    return (order.index(metric_key) if metric_key in order else len(order), metric)
