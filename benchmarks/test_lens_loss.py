"""Forward and forward+backward of every implementation on the ``suite`` plan's shapes.

Each case first checks the implementation's loss and gradient on the timed inputs against the
float64 reference (and fails, untimed, if they are off), then times it with pytest-benchmark,
rotating among input copies.  ``extra_info`` records the errors, the two bandwidth floors and
(for forward+backward) the peak memory above the inputs.  Unavailable implementations skip with
the reason.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from lens_kernels.bench import check
from lens_kernels.bench.measure import peak_bytes, synchronize
from lens_kernels.bench.plans import best_device, preset
from lens_kernels.bench.registry import select
from lens_kernels.bench.floors import floor_ms
from lens_kernels.bench.runner import MB, forward_backward

pytest.importorskip("pytest_benchmark")

DEVICE = best_device()
PLAN = preset("suite", DEVICE)

STEPS = ("fwd", "fwd+bwd")
CASES = [
    (shape, policy, mode, impl, step)
    for shape in PLAN.shapes() for policy in PLAN.policies for mode in PLAN.modes
    for impl in select(list(PLAN.impls), DEVICE) for step in STEPS
]


def _id(case) -> str:
    shape, policy, mode, impl, step = case
    return f"{impl.name}-{policy}-policy-{mode}-{step}-{shape.dtype_name}-V{shape.vocab}-N{shape.tokens}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_lens_loss(benchmark, problems, settings, case):
    shape, policy, mode, impl, step = case
    reason = impl.skip_reason(DEVICE, mode)
    if reason:
        pytest.skip(reason)
    copies, target = problems.get(shape, policy, mode)
    fn = impl.build(mode)
    loss = fn(copies[0])
    (grad,) = torch.autograd.grad(loss, impl.leaf(copies[0]))
    result = check.compare(loss, impl.logits_grad(grad), copies[0], target)
    del loss, grad
    assert result.passed, f"{impl.name} is off the float64 reference, not timed: {result}"
    call = fn if step == "fwd" else forward_backward(impl, fn)
    benchmark.extra_info.update(result.as_dict(), computes=impl.computes, copies=len(copies),
                                floor_2pass_ms=floor_ms(copies[0], settings.bandwidth, 2),
                                floor_1pass_ms=floor_ms(copies[0], settings.bandwidth, 1))
    if step == "fwd+bwd":
        benchmark.extra_info["peak_extra_mb"] = peak_bytes(call, copies[0], DEVICE) / MB
    rotation = itertools.cycle(copies)

    def timed(inputs):
        call(inputs)
        synchronize(DEVICE)

    benchmark.pedantic(timed, setup=lambda: ((next(rotation),), {}), rounds=PLAN.timer["max_runs"],
                       warmup_rounds=PLAN.timer["warmup"], iterations=1)
