"""The performance targets of issue 3, evaluated on whatever a run measured.

Targets are benchmarks, never timed tests: a run reports each as met, missed (by how much) or
not measured (its shape, implementation or device was not in the run).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .plans import CPU_TARGET, H100_TARGET


@dataclass(frozen=True)
class Target:
    """``value(subject, baseline) <= limit`` (``at_most``) or ``>= limit`` on one shape."""

    text: str
    device: str  # "cuda" or "cpu"
    where: tuple  # (dtype, vocab, tokens)
    subject: str
    baseline: Optional[str]
    metric: str  # "x_floor", "speedup", "memory_ratio", "extra_memory_ratio", "time_ratio"
    limit: float
    at_most: bool
    modes: tuple = ("lens", "grpo")


H100, CPU = H100_TARGET, CPU_TARGET
TARGETS = (
    Target("fused Triton fwd+bwd <= 1.25x the bandwidth floor", "cuda", H100, "fused-triton", None,
           "x_floor", 1.25, True),
    Target("fused Triton >= 8x faster than the eager reference", "cuda", H100, "fused-triton", "reference-eager",
           "speedup", 8.0, False),
    Target("fused Triton >= 2x faster than the compiled reference", "cuda", H100, "fused-triton",
           "reference-compiled", "speedup", 2.0, False),
    Target("fused Triton >= 1.3x faster than Liger's Triton GRPO loss", "cuda", H100, "fused-triton", "liger-grpo",
           "speedup", 1.3, False, modes=("grpo",)),
    Target("fused Triton peak above inputs and gradient <= 2% of the eager reference's", "cuda", H100,
           "fused-triton", "reference-eager", "extra_memory_ratio", 0.02, True),
    Target("fused torch peak extra memory (gradient included) <= 10% of the eager reference's", "cpu", CPU,
           "fused-torch", "reference-eager", "memory_ratio", 0.10, True),
    Target("fused torch peak extra memory above the gradient <= 10% of the eager reference's", "cpu", CPU,
           "fused-torch", "reference-eager", "extra_memory_ratio", 0.10, True),
    Target("fused torch fwd+bwd time no worse than the eager reference", "cpu", CPU, "fused-torch",
           "reference-eager", "time_ratio", 1.0, True),
)


def _value(metric: str, subject: dict, baseline: Optional[dict]) -> float:
    if metric == "x_floor":
        return subject["x_floor"]
    if metric == "speedup":
        return baseline["fwdbwd_median_ms"] / subject["fwdbwd_median_ms"]
    if metric == "time_ratio":
        return subject["fwdbwd_median_ms"] / baseline["fwdbwd_median_ms"]
    if metric == "memory_ratio":
        return subject["peak_extra_mb"] / baseline["peak_extra_mb"]
    if metric == "extra_memory_ratio":
        return subject["peak_extra_minus_grad_mb"] / baseline["peak_extra_minus_grad_mb"]
    raise ValueError(f"unknown metric {metric!r}")


def _find(records: list[dict], impl: str, mode: str, where: tuple) -> Optional[dict]:
    dtype, vocab, tokens = where
    for record in records:
        if (record["impl"], record["mode"], record["dtype"], record["vocab"], record["tokens"]) == (
            impl, mode, dtype, vocab, tokens
        ):
            return record
    return None


def _find_shape(records: list[dict], where: tuple) -> Optional[dict]:
    return next((r for r in records if (r["dtype"], r["vocab"], r["tokens"]) == where), None)


def evaluate(records: list[dict], device_type: str) -> list[dict]:
    """One entry per (target, mode) of this device type whose shape the run measured: value,
    limit and verdict."""
    results = []
    modes = sorted({r["mode"] for r in records})
    for target in TARGETS:
        if target.device != device_type:
            continue
        if _find_shape(records, target.where) is None:
            continue
        for mode in [m for m in modes if m in target.modes]:
            subject = _find(records, target.subject, mode, target.where)
            baseline = _find(records, target.baseline, mode, target.where) if target.baseline else None
            entry = dict(target=target.text, mode=mode, dtype=target.where[0], vocab=target.where[1],
                         tokens=target.where[2], limit=target.limit, at_most=target.at_most)
            runs = [subject] + ([baseline] if target.baseline else [])
            if any(r is None or r["status"] != "ok" for r in runs):
                missing = [name for name, r in zip((target.subject, target.baseline), runs)
                           if r is None or r["status"] != "ok"]
                results.append({**entry, "value": None, "verdict": f"not measured ({', '.join(missing)})"})
                continue
            value = _value(target.metric, subject, baseline)
            met = value <= target.limit if target.at_most else value >= target.limit
            verdict = "met" if met else f"missed by {abs(value / target.limit - 1):.0%}"
            results.append({**entry, "value": value, "verdict": verdict})
    return results
