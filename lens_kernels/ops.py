"""``torch.library`` custom ops around the backend launchers, with fake kernels and autograd.

Two differentiable ops make the loss: the vocabulary pass ``logits -> logp`` (backward
recomputes the softmax from the saved logsumexp) and the epilogue ``logp -> loss`` (its
forward also returns ``d loss / d logp``, so its backward is one multiply).  Being custom ops,
both are opaque to ``torch.compile``: a training step calling ``fused_lens_loss`` compiles
with ``fullgraph=True`` whatever the backend.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends
from .backends import torch_backend
from .config import EpilogueResult, LossConfig
from .groups import GroupLayout

_LIB = "lens_kernels"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of log-probs and logsumexps: fp32, or float64 for float64 logits."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op(f"{_LIB}::logprobs_fwd", mutates_args=())
def _logprobs_fwd(
    logits: Tensor, target_ids: Tensor, inv_temperature: float, backend: str, inplace_backward: bool
) -> tuple[Tensor, Tensor]:
    return backends.get(backend).logprobs_forward(logits, target_ids.contiguous(), inv_temperature)


@_logprobs_fwd.register_fake
def _(logits, target_ids, inv_temperature, backend, inplace_backward):
    shape, dtype = logits.shape[:2], accumulation_dtype(logits.dtype)
    return logits.new_empty(shape, dtype=dtype), logits.new_empty(shape, dtype=dtype)


@torch.library.custom_op(f"{_LIB}::logprobs_bwd", mutates_args=())
def _logprobs_bwd(
    grad_logp: Tensor, logits: Tensor, target_ids: Tensor, lse: Tensor, inv_temperature: float, backend: str
) -> Tensor:
    return backends.get(backend).logprobs_backward(
        grad_logp, logits, target_ids.contiguous(), lse, inv_temperature, False
    )


@_logprobs_bwd.register_fake
def _(grad_logp, logits, target_ids, lse, inv_temperature, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op(f"{_LIB}::logprobs_bwd_inplace", mutates_args=("logits",))
def _logprobs_bwd_inplace(
    logits: Tensor, grad_logp: Tensor, target_ids: Tensor, lse: Tensor, inv_temperature: float, backend: str
) -> None:
    backends.get(backend).logprobs_backward(grad_logp, logits, target_ids.contiguous(), lse, inv_temperature, True)


@_logprobs_bwd_inplace.register_fake
def _(logits, grad_logp, target_ids, lse, inv_temperature, backend):
    return None


def _logprobs_setup(ctx, inputs, output):
    logits, target_ids, inv_temperature, backend, inplace_backward = inputs
    ctx.save_for_backward(logits, target_ids, output[1])
    ctx.inv_temperature, ctx.backend, ctx.inplace = inv_temperature, backend, inplace_backward
    ctx.mark_non_differentiable(output[1])


def _logprobs_backward(ctx, grad_logp, _grad_lse):
    logits, target_ids, lse = ctx.saved_tensors
    grad_logp = grad_logp.to(lse.dtype).contiguous()
    if ctx.inplace:
        _logprobs_bwd_inplace(logits, grad_logp, target_ids, lse, ctx.inv_temperature, ctx.backend)
        grad = logits
    else:
        grad = _logprobs_bwd(grad_logp, logits, target_ids, lse, ctx.inv_temperature, ctx.backend)
    return grad, None, None, None, None


_logprobs_fwd.register_autograd(_logprobs_backward, setup_context=_logprobs_setup)


def token_logprobs(
    logits: Tensor, target_ids: Tensor, temperature: float, backend: str, inplace_backward: bool = False
) -> Tensor:
    """Differentiable ``[B, T]`` fp32 log-probs through backend ``backend`` (no checks)."""
    logp, _ = _logprobs_fwd(logits, target_ids, 1.0 / temperature, backend, inplace_backward)
    return logp


@torch.library.custom_op(f"{_LIB}::epilogue_fwd", mutates_args=())
def _epilogue_fwd(
    logp: Tensor, old: Tensor, mask: Tensor, rewards: Tensor, ref: Optional[Tensor],
    group_id: Tensor, order: Tensor, start: Tensor, size: Tensor,
    num_groups: int, max_size: int,
    mode: str, alpha: float, eps_low: float, eps_high: float, clip_ratio_c: Optional[float],
    beta: float, loss_agg_mode: str, scale_by_std: bool, std_eps: float,
    length_gamma: Optional[float], backend: str,
) -> list[Tensor]:
    groups = GroupLayout(group_id, order, start, size, num_groups, max_size)
    cfg = LossConfig(mode, alpha, eps_low, eps_high, clip_ratio_c, beta, loss_agg_mode,
                     scale_by_std, std_eps, length_gamma)
    result = backends.get(backend).epilogue_forward(logp, old, mask, rewards, groups, ref, cfg)
    kl = result.kl if result.kl is not None else logp.new_zeros(())
    return [t.contiguous() for t in result._replace(kl=kl)]


@_epilogue_fwd.register_fake
def _(logp, old, mask, rewards, ref, group_id, order, start, size, num_groups, *args):
    batch = logp.shape[0]
    scalar, row = logp.new_empty(()), logp.new_empty((batch,))
    return [scalar, torch.empty_like(logp), row, row.clone(), row.clone(),
            logp.new_empty((num_groups,)), scalar.clone(), scalar.clone(), scalar.clone()]


def _epilogue_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _epilogue_backward(ctx, grads):
    (dlogp,) = ctx.saved_tensors
    grad_logp = grads[0] * dlogp
    return (grad_logp,) + (None,) * 21


_epilogue_fwd.register_autograd(_epilogue_backward, setup_context=_epilogue_setup)


def epilogue(
    logp: Tensor, old: Tensor, mask: Tensor, rewards: Tensor, groups: GroupLayout,
    ref: Optional[Tensor], cfg: LossConfig, backend: str,
) -> EpilogueResult:
    """SPEC steps 3-9 through backend ``backend``; ``loss`` is differentiable in ``logp``.

    The torch backend's epilogue is plain differentiable PyTorch, called directly (and traced
    by ``torch.compile``); kernel backends go through the custom op above.
    """
    if backend == "torch":
        return torch_backend.epilogue(logp, old, mask, rewards, groups, ref, cfg)
    outputs = _epilogue_fwd(
        logp, old, mask, rewards, ref, groups.group_id, groups.order, groups.start, groups.size,
        groups.num_groups, groups.max_size,
        cfg.mode, cfg.alpha, cfg.eps_low, cfg.eps_high, cfg.clip_ratio_c, cfg.beta,
        cfg.loss_agg_mode, cfg.scale_by_std, cfg.std_eps, cfg.length_gamma, backend,
    )
    result = EpilogueResult(*outputs)
    return result._replace(kl=None if ref is None else result.kl)
