"""``torch.library`` custom ops of the fused-linear vocabulary pass, with fake kernels and autograd.

One differentiable op, ``(hidden [N, d], weight [V, d], bias [V] or None) -> logp [N]``: its
forward returns the per-row logsumexp as well (saved for the backward, not differentiable),
its backward recomputes the logits from the saved inputs and returns ``dh``, ``dW`` and
``dbias`` in one call.  As custom ops both are opaque to ``torch.compile``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

_LIB = "lens_kernels"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the log-probs: fp32, or float64 for float64 inputs (torch backend)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launchers(backend: str) -> tuple[Callable, Callable]:
    """``(forward, backward)`` launchers of ``backend`` (``"torch"`` or ``"triton"``)."""
    if backend == "torch":
        from .backends import torch_linear

        return torch_linear.linear_logprobs_forward, torch_linear.linear_logprobs_backward
    from .backends.triton import linear_backward, linear_forward

    return linear_forward.linear_logprobs_forward, linear_backward.linear_logprobs_backward


@torch.library.custom_op(f"{_LIB}::linear_logprobs_fwd", mutates_args=())
def _linear_fwd(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target_ids: Tensor, inv_temperature: float, backend: str
) -> tuple[Tensor, Tensor]:
    return _launchers(backend)[0](hidden, weight, bias, target_ids.contiguous(), inv_temperature)


@_linear_fwd.register_fake
def _(hidden, weight, bias, target_ids, inv_temperature, backend):
    rows, dtype = hidden.shape[0], accumulation_dtype(hidden.dtype)
    return hidden.new_empty((rows,), dtype=dtype), hidden.new_empty((rows,), dtype=dtype)


@torch.library.custom_op(f"{_LIB}::linear_logprobs_bwd", mutates_args=())
def _linear_bwd(
    grad_logp: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target_ids: Tensor, lse: Tensor,
    inv_temperature: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    dh, dw, dbias = _launchers(backend)[1](grad_logp, hidden, weight, bias, target_ids.contiguous(), lse,
                                           inv_temperature)
    return dh, dw, hidden.new_empty((0,)) if dbias is None else dbias


@_linear_bwd.register_fake
def _(grad_logp, hidden, weight, bias, target_ids, lse, inv_temperature, backend):
    dbias = hidden.new_empty((0,)) if bias is None else torch.empty_like(bias, memory_format=torch.contiguous_format)
    return (torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device),
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device), dbias)


def _setup(ctx, inputs, output):
    hidden, weight, bias, target_ids, inv_temperature, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, target_ids, output[1])
    ctx.inv_temperature, ctx.backend = inv_temperature, backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_logp, _grad_lse):
    hidden, weight, bias, target_ids, lse = ctx.saved_tensors
    grad_logp = grad_logp.to(lse.dtype).contiguous()
    dh, dw, dbias = _linear_bwd(grad_logp, hidden, weight, bias, target_ids, lse, ctx.inv_temperature, ctx.backend)
    need = ctx.needs_input_grad
    return (dh if need[0] else None, dw if need[1] else None, dbias if bias is not None and need[2] else None,
            None, None, None)


_linear_fwd.register_autograd(_backward, setup_context=_setup)


def linear_token_logprobs(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target_ids: Tensor, temperature: float, backend: str
) -> Tensor:
    """Differentiable ``[N]`` log-probs of ``(hidden [N, d] @ weight.T + bias) / temperature``
    at ``target_ids [N]`` through backend ``backend`` (no checks)."""
    logp, _ = _linear_fwd(hidden, weight, bias, target_ids, 1.0 / temperature, backend)
    return logp
