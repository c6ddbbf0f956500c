"""The performance targets (issue 8's T1-T4 on the GPU, issue 3's on the CPU), evaluated on
whatever a run measured.

Targets are benchmarks, never timed tests.  A target covers one or more shapes, modes and
policies; a run reports its worst value over the cases it measured (and where), the verdict
met or missed (by how much), and how many of the cases were measured; a target none of whose
shapes the run measured is left out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .plans import CPU_TARGET, GPU_SWEEP_TOKENS, H100_TARGET, SMALL_TARGET
from .problems import MODEL_VOCABS

BF16_SWEEP = tuple(("bf16", v, n) for v in MODEL_VOCABS.values() for n in GPU_SWEEP_TOKENS)
LIGER = {"grpo": "liger-grpo", "lens": "liger-lens"}  # the do-it-yourself competitor per mode
GPU_FUSED = ("fused-triton", "fused-cuda")


@dataclass(frozen=True)
class Target:
    """``value(subject, baseline) <= limit`` (``at_most``) or ``>= limit`` in every case
    (shape x mode x policy).  ``baseline="liger"`` means Liger in the case's mode."""

    label: str
    text: str
    device: str  # "cuda" or "cpu"
    shapes: tuple  # of (dtype, vocab, tokens)
    subject: str
    baseline: Optional[str]
    metric: str  # a key of METRICS
    limit: float
    at_most: bool
    modes: tuple = ("lens", "grpo")
    policies: tuple = ("on", "off")

    def baseline_for(self, mode: str) -> Optional[str]:
        return LIGER[mode] if self.baseline == "liger" else self.baseline


METRICS = {
    "x_floor_1pass": lambda s, b: s["x_floor_1pass"],
    "x_floor_2pass": lambda s, b: s["x_floor_2pass"],
    "fwdbwd_ms": lambda s, b: s["fwdbwd_median_ms"],
    "host_ms": lambda s, b: s["host_fwdbwd_median_ms"],
    "extra_mb": lambda s, b: s["peak_extra_minus_grad_mb"],
    "speedup": lambda s, b: b["fwdbwd_median_ms"] / s["fwdbwd_median_ms"],
    "time_ratio": lambda s, b: s["fwdbwd_median_ms"] / b["fwdbwd_median_ms"],
    "memory_ratio": lambda s, b: s["peak_extra_mb"] / b["peak_extra_mb"],
    "extra_memory_ratio": lambda s, b: s["peak_extra_minus_grad_mb"] / b["peak_extra_minus_grad_mb"],
}


def _gpu_targets(subject: str) -> list[Target]:
    short = subject.removeprefix("fused-")
    return [
        Target("T1", f"{short}: >= 1.3x faster than Liger (liger-grpo / liger-lens), off-policy", "cuda",
               (H100_TARGET,), subject, "liger", "speedup", 1.3, False, policies=("off",)),
        Target("T1", f"{short}: fwd+bwd <= 1.15x the one-pass floor, off-policy", "cuda", (H100_TARGET,),
               subject, None, "x_floor_1pass", 1.15, True, policies=("off",)),
        Target("T2", f"{short}: never slower than Liger, every bf16 sweep shape, mode and policy", "cuda",
               BF16_SWEEP, subject, "liger", "time_ratio", 1.0, True),
        Target("T3", f"{short}: fwd+bwd <= 0.5 ms", "cuda", (SMALL_TARGET,), subject, None, "fwdbwd_ms", 0.5, True),
        Target("T3", f"{short}: host time of fwd+bwd <= 0.25 ms (value checks off)", "cuda", (SMALL_TARGET,),
               subject, None, "host_ms", 0.25, True),
        Target("T4", f"{short}: peak above inputs and gradient <= 1 MB", "cuda", (H100_TARGET,), subject, None,
               "extra_mb", 1.0, True),
        Target("T4", f"{short}: on-policy lens fwd+bwd <= 1.15x the two-pass floor", "cuda", (H100_TARGET,),
               subject, None, "x_floor_2pass", 1.15, True, modes=("lens",), policies=("on",)),
        Target("I3", f"{short}: >= 8x faster than the eager reference", "cuda", (H100_TARGET,), subject,
               "reference-eager", "speedup", 8.0, False),
        Target("I3", f"{short}: >= 2x faster than the compiled reference", "cuda", (H100_TARGET,), subject,
               "reference-compiled", "speedup", 2.0, False),
    ]


CPU, CPU_LENS = (CPU_TARGET,), ("lens",)
TARGETS = tuple(t for subject in GPU_FUSED for t in _gpu_targets(subject)) + (
    Target("I3", "torch: peak extra memory (gradient included) <= 10% of the eager reference's", "cpu", CPU,
           "fused-torch", "reference-eager", "memory_ratio", 0.10, True, modes=CPU_LENS),
    Target("I3", "torch: peak extra memory above the gradient <= 10% of the eager reference's", "cpu", CPU,
           "fused-torch", "reference-eager", "extra_memory_ratio", 0.10, True, modes=CPU_LENS),
    Target("I3", "torch: fwd+bwd time no worse than the eager reference", "cpu", CPU, "fused-torch",
           "reference-eager", "time_ratio", 1.0, True, modes=CPU_LENS),
)


def _index(records: list[dict]) -> dict:
    """The first record of each (impl, mode, policy, dtype, vocab, tokens)."""
    index: dict = {}
    for r in records:
        index.setdefault((r["impl"], r["mode"], r["policy"], r["dtype"], r["vocab"], r["tokens"]), r)
    return index


def _where(case: tuple) -> str:
    (dtype, vocab, tokens), mode, policy = case
    return f"V={vocab} N={tokens} {dtype} {policy}-policy {mode}"


def evaluate_one(target: Target, index: dict, measured_shapes: set) -> Optional[dict]:
    """The worst value of ``target`` over its cases that ran, or None when the run measured
    none of its shapes."""
    if not measured_shapes.intersection(target.shapes):
        return None
    cases = [(s, m, p) for s in target.shapes for m in target.modes for p in target.policies]
    values, missing = [], set()
    for case in cases:
        shape, mode, policy = case
        names = [target.subject] + ([target.baseline_for(mode)] if target.baseline else [])
        runs = [index.get((name, mode, policy, *shape)) for name in names]
        absent = [name for name, r in zip(names, runs) if r is None or r["status"] != "ok"]
        if absent:
            missing.update(absent)
            continue
        subject, baseline = runs[0], (runs[1] if target.baseline else None)
        values.append((METRICS[target.metric](subject, baseline), case))
    entry = dict(label=target.label, target=target.text, limit=target.limit, at_most=target.at_most,
                 cases=len(cases), measured=len(values), value=None, worst_at=None)
    if not values:
        return {**entry, "verdict": f"not measured ({', '.join(sorted(missing))})"}
    value, case = (max if target.at_most else min)(values, key=lambda item: item[0])
    met = value <= target.limit if target.at_most else value >= target.limit
    verdict = "met" if met else f"missed by {abs(value / target.limit - 1):.0%}"
    if len(values) < len(cases):
        verdict += f" ({len(values)} of {len(cases)} cases measured)"
    return {**entry, "value": value, "worst_at": _where(case), "verdict": verdict}


def evaluate(records: list[dict], device_type: str) -> list[dict]:
    """One entry per target of this device type with a shape the run measured."""
    index = _index(records)
    shapes = {(r["dtype"], r["vocab"], r["tokens"]) for r in records}
    results = [evaluate_one(t, index, shapes) for t in TARGETS if t.device == device_type]
    return [r for r in results if r is not None]
