"""Benchmarks of the fused LENS loss: one registry of implementations, one set of shapes.

``registry`` (what is compared and what each computes), ``problems`` (shapes and inputs),
``check`` (the float64 correctness gate), ``measure`` (timing, peak memory, copy bandwidth),
``runner`` (check, then time, then memory, per shape), ``report``/``plot`` (table, JSON,
markdown, PNG), ``targets`` (the issue's targets) and ``cli`` (``lens-bench``).  The
pytest-benchmark suite in ``benchmarks/`` uses the same registry and shapes.
"""
from .problems import Inputs, Shape, make_inputs, shape_for_tokens
from .registry import REGISTRY, Impl, select

__all__ = ["Inputs", "Shape", "make_inputs", "shape_for_tokens", "REGISTRY", "Impl", "select"]
