"""Correctness against the float64 reference, on the very inputs that are timed.

The reference (``lens_kernels.reference``) materialises ``log_softmax`` in float64, which for
the large shapes would not fit on any device.  The loss depends on the logits only through
the per-token log-probs, row by row, so the float64 result is assembled from the reference's
own functions without ever holding ``[B, T, V]`` float64 tensors:

1. ``logp = reference.token_logprobs(logits, targets)`` in float64, chunk of rows by chunk;
2. ``loss = reference.epilogue(logp, ...)`` in float64 and ``dlogp = d loss / d logp``;
3. per chunk, ``d loss / d logits = autograd of reference.token_logprobs`` with ``dlogp`` as
   the output gradient (the chain rule, exact), compared with the implementation's gradient.

``tests/test_bench_cli.py`` checks that this equals ``reference.fused_lens_loss`` plus
autograd on a small problem.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from .. import reference
from ..config import LensOptions
from .problems import Inputs

CHUNK_BYTES = 256 * 2**20
# The benchmark's pass mark (the test suite enforces the SPEC's tighter promises): loss
# within LOSS_TOL * max(1, |loss|), gradient within GRAD_RTOL of its largest magnitude.
LOSS_TOL = 1e-4
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _chunks(inputs: Inputs) -> Iterator[tuple[int, slice]]:
    batch, length, vocab = inputs.logits.shape
    step = max(1, CHUNK_BYTES // (4 * 8 * vocab))
    for b in range(batch):
        for start in range(0, length, step):
            yield b, slice(start, min(length, start + step))


def gold_logprobs(inputs: Inputs) -> torch.Tensor:
    """Step 1 in float64, ``[B, T]``."""
    logp = torch.empty(inputs.target_ids.shape, dtype=torch.float64, device=inputs.device)
    with torch.no_grad():
        for b, cols in _chunks(inputs):
            logp[b, cols] = reference.token_logprobs(
                inputs.logits[b:b + 1, cols], inputs.target_ids[b:b + 1, cols], inputs.temperature
            )[0]
    return logp


@dataclass(frozen=True)
class Gold:
    """The float64 loss, ``d loss / d logp`` and clip fraction for one problem and mode."""

    loss: float
    dlogp: torch.Tensor  # [B, T] float64
    clip_fraction: float  # of the completion tokens (0 on-policy)


def gold(inputs: Inputs, mode: str, logp: torch.Tensor) -> Gold:
    """Steps 2-9 in float64 from :func:`gold_logprobs` (default options; on-policy, or
    off-policy from ``inputs.old_logprobs``)."""
    logp = logp.detach().requires_grad_(True)
    old = logp.detach() if inputs.old_logprobs is None else inputs.old_logprobs.double()
    result = reference.epilogue(
        logp, old, inputs.completion_mask, inputs.rewards.double(), inputs.groups, LensOptions(mode=mode)
    )
    (dlogp,) = torch.autograd.grad(result.loss, logp)
    return Gold(float(result.loss.detach()), dlogp, float(result.clip_fraction))


@dataclass(frozen=True)
class CheckResult:
    loss: float
    loss_error: float  # |loss - float64 loss|
    grad_error: float  # max |grad - float64 grad|
    grad_scale: float  # max |float64 grad|
    passed: bool

    @property
    def grad_relative_error(self) -> float:
        return self.grad_error / self.grad_scale if self.grad_scale else self.grad_error

    def as_dict(self) -> dict:
        return dict(loss=self.loss, loss_error=self.loss_error, grad_error=self.grad_error,
                    grad_scale=self.grad_scale, grad_relative_error=self.grad_relative_error,
                    check_passed=self.passed)


def compare(loss: torch.Tensor, grad: torch.Tensor, inputs: Inputs, target: Gold) -> CheckResult:
    """Errors of an implementation's ``loss`` and ``grad [B, T, V]`` against ``target``."""
    value = float(loss.detach())
    loss_error = abs(value - target.loss)
    grad_error = grad_scale = 0.0
    for b, cols in _chunks(inputs):
        x = inputs.logits[b:b + 1, cols].detach().double().requires_grad_(True)
        logp = reference.token_logprobs(x, inputs.target_ids[b:b + 1, cols], inputs.temperature)
        (exact,) = torch.autograd.grad(logp, x, grad_outputs=target.dlogp[b:b + 1, cols])
        diff = float((grad[b, cols].double() - exact[0]).abs().max())
        grad_scale = max(grad_scale, float(exact.abs().max()))
        grad_error = diff if math.isnan(diff) else max(grad_error, diff)
        if math.isnan(grad_error):
            break
    passed = (
        loss_error <= LOSS_TOL * max(1.0, abs(target.loss))
        and grad_error <= GRAD_RTOL[inputs.shape.dtype] * grad_scale
    )
    return CheckResult(value, loss_error, grad_error, grad_scale, bool(passed))
