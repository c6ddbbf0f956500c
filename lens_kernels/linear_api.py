"""Public fused-linear functions: log-probs and the LENS loss straight from the hidden states
and the output (``lm_head``) weight, never materialising the ``[B, T, V]`` logits."""
from __future__ import annotations

from typing import Optional

import torch

from . import linear_ops
from .linear_validation import check_linear, check_linear_backend
from .validation import ValueChecks, check_temperature


def fused_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    temperature: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``log softmax((hidden @ weight.T + bias) / temperature)[target]`` without the logits.

    ``hidden [B, T, d]`` (the last hidden states, already shifted so that ``hidden[b, t]``
    predicts ``target_ids[b, t]``), ``weight [V, d]`` and ``bias [V]`` (optional) of the same
    dtype (fp32, bf16 or fp16; float64 with ``backend="torch"``), ``target_ids [B, T]`` int64
    -> ``[B, T]`` fp32 (float64 for float64 inputs).  Differentiable in ``hidden``, ``weight``
    and ``bias``; under ``torch.no_grad()`` it is the sampler-side "old log-probs" pass.

    ``backend``: ``"auto"`` (Triton on CUDA, torch otherwise), ``"triton"`` or ``"torch"``.
    Memory: the forward keeps ``O(N)`` floats besides its inputs (plus ``O(N V / 2048)``
    partials on Triton); the backward holds one vocabulary chunk of the logits' gradient at a
    time (at most 512 MiB on Triton) and an fp32 ``[N, d]`` accumulator.
    """
    checks = ValueChecks()
    batch, length, dim, _ = check_linear(hidden, weight, bias, target_ids, checks)
    temperature = check_temperature(temperature)
    backend = check_linear_backend(backend, hidden)
    checks.settle()
    logp = linear_ops.linear_token_logprobs(
        hidden.reshape(batch * length, dim), weight, bias, target_ids.reshape(-1), temperature, backend
    )
    return logp.view(batch, length)
