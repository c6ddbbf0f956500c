"""``torch.library`` custom ops of the fused-linear path, with fake kernels and autograd.

* ``linear_logprobs_fwd`` / ``_bwd``: the differentiable vocabulary pass ``(hidden [N, d],
  weight [V, d], bias [V] or None) -> (logp [N], lse [2, N], entropy [N] or [0])``: the
  per-row logsumexp, as the row max and the log of the sum of exponentials from it (their
  sum; apart, ``(z - m) - log s`` keeps a near-certain token's ``log p`` exact at large
  ``|z|``), is saved for the backward (not differentiable), the entropy made only when asked
  for; the backward recomputes the logits from the saved inputs and returns ``dh``, ``dW``
  and ``dbias`` in one call, with the entropy's share only when its gradient is not None.
* ``linear_loss_one_pass``: the whole loss in one pass on a GPU backend
  (``backends.linear_one_pass``), with the gradients made during the forward; :class:`LinearLensLoss`
  is its autograd, whose backward scales them by ``grad_output`` (``ops.scale_rows_``).

As custom ops they are opaque to ``torch.compile``.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor

from . import ops
from .config import LensOptions
from .groups import GroupLayout

_LIB = "lens_kernels"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the log-probs: fp32, or float64 for float64 inputs (torch backend)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launchers(path: str) -> tuple[Callable, Callable]:
    """``(forward, backward)`` launchers of ``path``: ``"torch"`` (chunked matmuls),
    ``"tiles"`` (Triton logit tiles) or ``"blocks:<backend>"`` (library GEMMs on row blocks,
    the row kernels of backend triton or cuda)."""
    if path == "torch":
        from .backends import torch_linear

        return torch_linear.linear_logprobs_forward, torch_linear.linear_logprobs_backward
    if path.startswith("blocks:"):
        from .backends import linear_blocks

        backend = path.split(":", 1)[1]
        return (functools.partial(linear_blocks.linear_logprobs_forward, backend=backend),
                functools.partial(linear_blocks.linear_logprobs_backward, backend=backend))
    from .backends.triton import linear_backward, linear_forward

    return linear_forward.linear_logprobs_forward, linear_backward.linear_logprobs_backward


@torch.library.custom_op(f"{_LIB}::linear_logprobs_fwd", mutates_args=())
def _linear_fwd(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target_ids: Tensor, live: Optional[Tensor],
    inv_temperature: float, path: str, entropy: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    live = None if live is None else live.contiguous()
    logp, lse, ent = _launchers(path)[0](hidden, weight, bias, target_ids.contiguous(), inv_temperature, live=live,
                                         entropy=entropy)
    return logp, lse, logp.new_empty((0,)) if ent is None else ent


@_linear_fwd.register_fake
def _(hidden, weight, bias, target_ids, live, inv_temperature, path, entropy):
    rows, dtype = hidden.shape[0], accumulation_dtype(hidden.dtype)
    return (hidden.new_empty((rows,), dtype=dtype), hidden.new_empty((2, rows), dtype=dtype),
            hidden.new_empty((rows if entropy else 0,), dtype=dtype))


@torch.library.custom_op(f"{_LIB}::linear_logprobs_bwd", mutates_args=())
def _linear_bwd(
    grad_logp: Tensor, grad_entropy: Optional[Tensor], hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    target_ids: Tensor, lse: Tensor, entropy: Optional[Tensor], inv_temperature: float, path: str,
) -> tuple[Tensor, Tensor, Tensor]:
    dh, dw, dbias = _launchers(path)[1](grad_logp, hidden, weight, bias, target_ids.contiguous(), lse,
                                        inv_temperature, grad_entropy=grad_entropy, entropy=entropy)
    return dh, dw, hidden.new_empty((0,)) if dbias is None else dbias


@_linear_bwd.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, target_ids, lse, entropy, inv_temperature, path):
    dbias = hidden.new_empty((0,)) if bias is None else torch.empty_like(bias, memory_format=torch.contiguous_format)
    return (torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device),
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device), dbias)


def _setup(ctx, inputs, output):
    hidden, weight, bias, target_ids, live, inv_temperature, path, entropy = inputs
    ctx.save_for_backward(hidden, weight, bias, target_ids, live, output[1], output[2] if entropy else None)
    ctx.inv_temperature, ctx.path = inv_temperature, path
    ctx.mark_non_differentiable(output[1])
    if not entropy:
        ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no work for it


def _backward(ctx, grad_logp, _grad_lse, grad_entropy):
    hidden, weight, bias, target_ids, live, lse, entropy = ctx.saved_tensors
    if grad_logp is None and (grad_entropy is None or entropy is None):
        return (None,) * 8

    def masked(grad):  # fp32 (float64) contiguous, 0 at rows that are not live
        grad = grad.to(lse.dtype)
        return (grad if live is None else torch.where(live, grad, 0)).contiguous()

    grad_logp = lse.new_zeros(lse.shape[1:]) if grad_logp is None else masked(grad_logp)
    grad_entropy = None if grad_entropy is None or entropy is None else masked(grad_entropy)
    dh, dw, dbias = _linear_bwd(grad_logp, grad_entropy, hidden, weight, bias, target_ids, lse,
                                None if grad_entropy is None else entropy, ctx.inv_temperature, ctx.path)
    need = ctx.needs_input_grad
    return (dh if need[0] else None, dw if need[1] else None, dbias if bias is not None and need[2] else None,
            None, None, None, None, None)


_linear_fwd.register_autograd(_backward, setup_context=_setup)


def linear_token_logprobs(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target_ids: Tensor, temperature: float, path: str,
    live: Optional[Tensor] = None, entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Differentiable ``[N]`` log-probs of ``(hidden [N, d] @ weight.T + bias) / temperature``
    at ``target_ids [N]`` through ``path`` (see ``_launchers``; no checks), and with ``entropy``
    the ``[N]`` entropies of the same softmax, made in the same pass: ``(logp, entropy)``, both
    differentiable (the entropy's gradient costs nothing when none is asked for).  ``live [N]``
    bool (optional): rows that are False get 0 and no gradient, and the launchers skip
    their work where they can (Triton tiles: every row tile with no live row; torch: every
    such row).  The tiles skip whole row tiles, so there the live rows are packed first (a
    stable device sort, the hidden states gathered once; autograd takes the gradient back):
    padding then costs no FLOPs, and rows with a zero gradient (a group's, contiguous) stay
    together for the backward's skipping."""
    inv_t = 1.0 / temperature
    if live is None or path != "tiles":
        logp, _, ent = _linear_fwd(hidden, weight, bias, target_ids, live, inv_t, path, entropy)
        return (logp, ent) if entropy else logp
    order = torch.argsort((~live).to(torch.int8), stable=True)
    logp, _, ent = _linear_fwd(hidden[order], weight, bias, target_ids[order], live[order], inv_t, path, entropy)
    logp = torch.zeros_like(logp).scatter(0, order, logp)
    return (logp, torch.zeros_like(ent).scatter(0, order, ent)) if entropy else logp


# ---- the whole loss in one pass (GPU backends) ----------------------------------------------


def _loss_one_pass_impl(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target_ids: Tensor, live: Tensor, rewards: Tensor,
    old: Optional[Tensor], ref: Optional[Tensor], advantages: Optional[Tensor], order: Optional[Tensor],
    start: Optional[Tensor], size: Optional[Tensor], group_sizes: list[int], options: str, gemm: str,
    needs: list[bool],
) -> list[Tensor]:
    from .backends.linear_one_pass import linear_one_pass

    result, grads = linear_one_pass(
        hidden, weight, bias, target_ids, live, rewards, old, ref, advantages,
        ops.group_layout(target_ids.shape[0], group_sizes, order, start, size), LensOptions.from_key(options),
        (needs[0], needs[1], needs[2]), gemm,
    )
    return ops.flatten_results(result, live) + [hidden.new_empty(0) if g is None else g for g in grads]


_loss_one_pass = torch.library.custom_op(f"{_LIB}::linear_loss_one_pass", _loss_one_pass_impl, mutates_args=())


@_loss_one_pass.register_fake
def _(hidden, weight, bias, target_ids, live, rewards, old, ref, advantages, order, start, size, group_sizes,
      options, gemm, needs):
    results = ops.fake_results(target_ids, advantages is None, group_sizes[0] if group_sizes else 0, ref is not None)
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) if t is not None and need else hidden.new_empty(0)
             for t, need in zip((hidden, weight, bias), needs)]
    return results + grads


class LinearLensLoss(torch.autograd.Function):
    """The one-pass fused-linear loss, differentiable in ``hidden``, ``weight`` and ``bias``
    (every other output detached).  The forward makes the gradients the inputs need
    (``ctx.needs_input_grad``); the backward multiplies them by ``grad_output`` in place."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target_ids, live, rewards, old, ref, advantages, order, start, size,
                group_sizes, key: str, gemm: str):
        needs = [bool(n) for n in ctx.needs_input_grad[:3]]
        ctx.set_materialize_grads(False)
        *results, dh, dw, db = ops.call_op(
            _loss_one_pass, _loss_one_pass_impl, hidden, weight, bias, target_ids, live, rewards, old, ref,
            advantages, order, start, size, group_sizes, key, gemm, needs,
        )
        ctx.needs = needs
        ctx.save_for_backward(dh, dw, db)
        ctx.mark_non_differentiable(*results[1:])
        return tuple(results)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):
        if grad_loss is None:
            return (None,) * 15
        grads = []
        factor = ops.in_place_factor(ctx, grad_loss)
        for grad, need in zip(ctx.saved_tensors, ctx.needs):
            if need:  # [N, d], [V, d] or [V]: rows of the last dimension
                ops.call_op(ops.scale_rows_op, ops.scale_rows_impl, grad.view(1, -1, grad.shape[-1]), factor)
            grads.append(grad if need else None)
        return (*grads,) + (None,) * 12


def linear_loss_one_pass(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target_ids: Tensor, live: Tensor, rewards: Tensor,
    old: Optional[Tensor], ref: Optional[Tensor], advantages: Optional[Tensor], groups: Optional[GroupLayout],
    options: LensOptions, gemm: str = "library",
) -> dict:
    """The one-pass fused-linear loss (``hidden [N, d]``; arguments checked) as the dict of
    :func:`lens_kernels.ops.named_results`; ``loss`` is differentiable in hidden, weight and bias.
    ``gemm``: ``"library"`` or ``"triton"`` (``backends.linear_one_pass``)."""
    args = (hidden, weight, bias, target_ids, live, rewards, old, ref, advantages, *ops.group_args(groups),
            options.key, gemm)
    wants = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if wants:
        results = LinearLensLoss.apply(*args)
    else:  # nothing to differentiate: the forward GEMM and the loss kernel only
        results = ops.call_op(_loss_one_pass, _loss_one_pass_impl, *args, [False, False, False])[:-3]
    return ops.named_results(results, advantages, ref)
