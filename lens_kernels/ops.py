"""``torch.library`` custom ops around the backend launchers, and the autograd around them.

Layers (as in QuACK): custom op (kernels, opaque to ``torch.compile``, with a fake kernel) ->
autograd (``register_autograd`` or a ``torch.autograd.Function``) -> the public functions of
``lens_kernels.api``.  The options travel as one :class:`~lens_kernels.config.LensOptions`,
handed to custom ops as its ``key()`` string.

* ``logprobs_fwd`` / ``logprobs_bwd[_inplace]``: the vocabulary pass ``logits -> (logp,
  entropy)`` and its backward (differentiable token log-probs and entropies, and the torch
  backend's loss).
* ``loss_one_pass[_inplace]``, ``loss_two_pass``: the whole loss on a GPU backend
  (``backends.kernel_loss``); ``scale_rows_`` is the one-pass backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends
from .backends import kernel_loss
from .backends.common import scale_rows_
from .config import LensOptions
from .groups import GroupLayout

_LIB = "lens_kernels"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of log-probs and logsumexps: fp32, or float64 for float64 logits."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- the vocabulary pass ------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::logprobs_fwd", mutates_args=())
def _logprobs_fwd(
    logits: Tensor, target_ids: Tensor, inv_temperature: float, backend: str, inplace_backward: bool, entropy: bool
) -> tuple[Tensor, Tensor, Tensor]:
    logp, lse, ent = backends.get(backend).logprobs_forward(logits, target_ids, inv_temperature, entropy=entropy)
    return logp, lse, ent if entropy else logp.new_empty(0)  # an op returns tensors: empty = no entropy


@_logprobs_fwd.register_fake
def _(logits, target_ids, inv_temperature, backend, inplace_backward, entropy):
    shape, dtype = logits.shape[:2], accumulation_dtype(logits.dtype)
    ent = logits.new_empty(shape if entropy else (0,), dtype=dtype)
    return logits.new_empty(shape, dtype=dtype), logits.new_empty(shape, dtype=torch.float64), ent


@torch.library.custom_op(f"{_LIB}::logprobs_bwd", mutates_args=())
def _logprobs_bwd(
    grad_logp: Tensor, logits: Tensor, target_ids: Tensor, lse: Tensor, inv_temperature: float, backend: str,
    grad_scale: Optional[Tensor], grad_entropy: Optional[Tensor], entropy: Optional[Tensor],
) -> Tensor:
    return backends.get(backend).logprobs_backward(
        grad_logp, logits, target_ids, lse, inv_temperature, False, grad_scale, grad_entropy, entropy
    )


@_logprobs_bwd.register_fake
def _(grad_logp, logits, target_ids, lse, inv_temperature, backend, grad_scale, grad_entropy, entropy):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op(f"{_LIB}::logprobs_bwd_inplace", mutates_args=("logits",))
def _logprobs_bwd_inplace(
    logits: Tensor, grad_logp: Tensor, target_ids: Tensor, lse: Tensor, inv_temperature: float, backend: str,
    grad_scale: Optional[Tensor], grad_entropy: Optional[Tensor], entropy: Optional[Tensor],
) -> None:
    backends.get(backend).logprobs_backward(
        grad_logp, logits, target_ids, lse, inv_temperature, True, grad_scale, grad_entropy, entropy
    )


@_logprobs_bwd_inplace.register_fake
def _(logits, grad_logp, target_ids, lse, inv_temperature, backend, grad_scale, grad_entropy, entropy):
    return None


def _logprobs_grad(grad_logp, logits, target_ids, lse, inv_temperature, backend, inplace, grad_scale=None,
                   grad_entropy=None, entropy=None):
    """``d loss / d logits`` from ``grad_logp [B, T]`` (and ``grad_entropy [B, T]`` with the
    forward's ``entropy``): a new tensor, or the logits overwritten."""
    args = (target_ids, lse, inv_temperature, backend, grad_scale, grad_entropy, entropy)
    if inplace:  # the op, also in eager mode: it bumps the logits' version counter
        _logprobs_bwd_inplace(logits, grad_logp, *args)
        return logits
    if not torch.compiler.is_compiling():  # eager: the launcher itself (see call_op)
        return backends.get(backend).logprobs_backward(grad_logp, logits, target_ids, lse, inv_temperature, False,
                                                       grad_scale, grad_entropy, entropy)
    return _logprobs_bwd(grad_logp, logits, *args)


def _logprobs_setup(ctx, inputs, output):
    logits, target_ids, inv_temperature, backend, inplace_backward, entropy = inputs
    ctx.save_for_backward(logits, target_ids, output[1], output[2])
    ctx.inv_temperature, ctx.backend, ctx.inplace, ctx.entropy = inv_temperature, backend, inplace_backward, entropy
    ctx.mark_non_differentiable(output[1])
    # Unused outputs give None, not zeros: an entropy nobody differentiates costs nothing.
    ctx.set_materialize_grads(False)


def _logprobs_backward(ctx, grad_logp, _grad_lse, grad_entropy):
    logits, target_ids, lse, ent = ctx.saved_tensors
    if not ctx.entropy:  # the empty placeholder output (a compiler may hand it a gradient)
        grad_entropy = None
    if grad_logp is None and grad_entropy is None:
        return None, None, None, None, None, None
    work = accumulation_dtype(logits.dtype)
    grad_logp = lse.new_zeros(lse.shape, dtype=work) if grad_logp is None else grad_logp.to(work).contiguous()
    if grad_entropy is not None:
        grad_entropy = grad_entropy.to(work).contiguous()
    grad = _logprobs_grad(grad_logp, logits, target_ids, lse, ctx.inv_temperature, ctx.backend, ctx.inplace,
                          None, grad_entropy, ent if grad_entropy is not None else None)
    return grad, None, None, None, None, None


_logprobs_fwd.register_autograd(_logprobs_backward, setup_context=_logprobs_setup)


def token_logprobs(
    logits: Tensor, target_ids: Tensor, options: LensOptions, entropy: bool = False
) -> tuple[Tensor, Optional[Tensor]]:
    """Differentiable ``(logp, ent)`` through ``options.backend`` (arguments checked):
    ``[B, T, V] -> [B, T]``, or packed ``[N, V] -> [N]`` (run as ``[1, N, V]``); ``ent`` (the
    entropy of the softmax, differentiable too) is None unless ``entropy``."""
    packed = logits.dim() == 2
    if packed:
        logits, target_ids = logits.unsqueeze(0), target_ids.unsqueeze(0)
    logp, _, ent = _logprobs_fwd(
        logits, target_ids, options.inv_temperature, options.backend, options.inplace_backward, entropy
    )
    if packed:
        logp, ent = logp.squeeze(0), ent.squeeze(0) if entropy else ent
    return logp, ent if entropy else None


# ---- the whole loss on a GPU backend ------------------------------------------------------

# Results of the loss ops, in order (empty tensors stand for None: custom ops return tensors).
_RESULTS = ("loss", "logprobs", "advantages", "calibrated_rewards", "confidence", "difficulty",
            "negative_group_fraction", "clip_fraction", "kl")


def group_args(groups: Optional[GroupLayout]) -> tuple:
    """A layout as custom-op arguments: ``order, start, size`` and ``[num_groups, max_size,
    group_size]`` (``[]`` without groups)."""
    if groups is None:
        return None, None, None, []
    return groups.order, groups.start, groups.size, [groups.num_groups, groups.max_size, groups.group_size]


def group_layout(batch: int, sizes: list[int], order, start, size) -> Optional[GroupLayout]:
    if not sizes:
        return None
    num_groups, max_size, group_size = sizes
    return GroupLayout(batch, num_groups, max_size, group_size, None, order, start, size)


def flatten_results(result: kernel_loss.KernelLoss, like: Tensor) -> list[Tensor]:
    calibration = result.calibration
    if calibration is None:  # distinct empty tensors: outputs of a custom op may not alias
        calibration = tuple(like.new_empty(0, dtype=torch.float32) for _ in range(5))
    kl = result.kl if result.kl is not None else like.new_empty(0, dtype=torch.float32)
    return [result.loss, result.logp, *calibration, result.clip_fraction, kl]


def fake_results(like: Tensor, has_groups: bool, num_groups: int, has_ref: bool) -> list[Tensor]:
    """Fake results of a loss op whose ``[B, T, ...]`` input ``like`` gives the shape and device."""
    batch, length = like.shape[:2]
    f32 = dict(device=like.device, dtype=torch.float32)
    row = lambda: torch.empty(batch if has_groups else 0, **f32)  # noqa: E731
    return [torch.empty((), **f32), torch.empty((batch, length), **f32), row(), row(), row(),
            torch.empty(num_groups if has_groups else 0, **f32), torch.empty(() if has_groups else 0, **f32),
            torch.empty((), **f32), torch.empty(() if has_ref else 0, **f32)]


def _loss_one_pass_impl(
    logits: Tensor, target_ids: Tensor, live: Tensor, rewards: Tensor, old: Optional[Tensor], ref: Optional[Tensor],
    advantages: Optional[Tensor], order: Optional[Tensor], start: Optional[Tensor], size: Optional[Tensor],
    group_sizes: list[int], options: str, write_grad: bool,
) -> list[Tensor]:
    opts = LensOptions.from_key(options)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if write_grad else None
    result = kernel_loss.one_pass(logits, target_ids, live, rewards, old, ref, advantages,
                                  group_layout(logits.shape[0], group_sizes, order, start, size), opts, grad)
    return flatten_results(result, live) + ([grad] if write_grad else [])


_loss_one_pass = torch.library.custom_op(f"{_LIB}::loss_one_pass", _loss_one_pass_impl, mutates_args=())


@_loss_one_pass.register_fake
def _(logits, target_ids, live, rewards, old, ref, advantages, order, start, size, group_sizes, options, write_grad):
    results = fake_results(logits, advantages is None, group_sizes[0] if group_sizes else 0, ref is not None)
    return results + ([torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)] if write_grad else [])


def _loss_one_pass_inplace_impl(
    logits: Tensor, target_ids: Tensor, live: Tensor, rewards: Tensor, old: Optional[Tensor], ref: Optional[Tensor],
    advantages: Optional[Tensor], order: Optional[Tensor], start: Optional[Tensor], size: Optional[Tensor],
    group_sizes: list[int], options: str,
) -> list[Tensor]:
    opts = LensOptions.from_key(options)
    result = kernel_loss.one_pass(logits, target_ids, live, rewards, old, ref, advantages,
                                  group_layout(logits.shape[0], group_sizes, order, start, size), opts, logits)
    return flatten_results(result, live)


_loss_one_pass_inplace = torch.library.custom_op(f"{_LIB}::loss_one_pass_inplace", _loss_one_pass_inplace_impl, mutates_args=("logits",))


@_loss_one_pass_inplace.register_fake
def _(logits, target_ids, live, rewards, old, ref, advantages, order, start, size, group_sizes, options):
    return fake_results(logits, advantages is None, group_sizes[0] if group_sizes else 0, ref is not None)


def _loss_two_pass_impl(
    logits: Tensor, target_ids: Tensor, live: Tensor, rewards: Tensor, ref: Optional[Tensor],
    order: Optional[Tensor], start: Optional[Tensor], size: Optional[Tensor], group_sizes: list[int], options: str,
) -> list[Tensor]:
    opts = LensOptions.from_key(options)
    result = kernel_loss.two_pass(logits, target_ids, live, rewards, ref,
                                  group_layout(logits.shape[0], group_sizes, order, start, size), opts)
    return flatten_results(result, live) + [result.lse, result.dlogp]


_loss_two_pass = torch.library.custom_op(f"{_LIB}::loss_two_pass", _loss_two_pass_impl, mutates_args=())


@_loss_two_pass.register_fake
def _(logits, target_ids, live, rewards, ref, order, start, size, group_sizes, options):
    logp_like = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)
    lse_like = torch.empty_like(logp_like, dtype=torch.float64)
    return fake_results(logits, True, group_sizes[0], ref is not None) + [lse_like, logp_like]


def scale_rows_impl(grad: Tensor, grad_output: Tensor) -> None:
    scale_rows_(grad, grad_output)


scale_rows_op = torch.library.custom_op(f"{_LIB}::scale_rows_", scale_rows_impl, mutates_args=("grad",))


@scale_rows_op.register_fake
def _(grad, grad_output):
    return None


def call_op(op, impl, *args):
    """A loss custom op in eager mode runs its implementation directly: the op's Python
    dispatch costs tens of microseconds of host time per call, and only ``torch.compile``
    needs the op (which it treats as opaque)."""
    return op(*args) if torch.compiler.is_compiling() else impl(*args)


class LensLoss(torch.autograd.Function):
    """The loss on a GPU backend, differentiable in ``logits`` (every other output detached).

    Takes plain values only (``torch.compile`` traces it): the custom-op arguments, whether the
    one-pass path applies, and what the backward needs of the options."""

    @staticmethod
    def forward(ctx, logits, target_ids, live, rewards, old, ref, advantages, order, start, size, group_sizes,
                key: str, one_pass: bool, inplace: bool, inv_temperature: float, backend: str):
        ctx.one_pass, ctx.inplace, ctx.inv_temperature, ctx.backend = one_pass, inplace, inv_temperature, backend
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the detached outputs
        if one_pass:
            args = (logits, target_ids, live, rewards, old, ref, advantages, order, start, size, group_sizes, key)
            if inplace:
                results = call_op(_loss_one_pass_inplace, _loss_one_pass_inplace_impl, *args)
                grad = logits
            else:
                *results, grad = call_op(_loss_one_pass, _loss_one_pass_impl, *args, True)
            ctx.save_for_backward(grad)
        else:
            *results, lse, dlogp = call_op(
                _loss_two_pass, _loss_two_pass_impl, logits, target_ids, live, rewards, ref, order, start, size, group_sizes, key)
            ctx.save_for_backward(logits, target_ids, lse, dlogp)
        ctx.mark_non_differentiable(*results[1:])
        return tuple(results)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):
        if grad_loss is None:
            return (None,) * 16
        if ctx.one_pass:
            (grad,) = ctx.saved_tensors
            call_op(scale_rows_op, scale_rows_impl, grad, in_place_factor(ctx, grad_loss))
        else:
            logits, target_ids, lse, dlogp = ctx.saved_tensors
            grad = _logprobs_grad(dlogp, logits, target_ids, lse, ctx.inv_temperature, ctx.backend, ctx.inplace,
                                  grad_loss)
        return (grad,) + (None,) * 15


def in_place_factor(ctx, grad_loss: Tensor) -> Tensor:
    """What to multiply a gradient made in the forward and scaled in place by: ``grad_loss`` on
    the first backward; on a later one (``retain_graph=True``) ``grad_loss`` over the factor the
    stored gradient already carries, so that every backward returns ``grad_loss * gradient``
    (after a first backward with ``grad_loss = 0`` the gradient is lost: NaN, not wrong)."""
    previous = getattr(ctx, "applied_scale", None)
    ctx.applied_scale = grad_loss.detach()
    return grad_loss if previous is None else grad_loss / previous


def kernel_loss_forward(logits, target_ids, live, rewards, old, ref, advantages, groups, options) -> dict:
    """The GPU-backend loss as a dict of :data:`_RESULTS` (None where absent)."""
    one_pass = kernel_loss.one_pass_applies(options, old is not None, advantages is not None)
    args = (logits, target_ids, live, rewards, old, ref, advantages, *group_args(groups), options.key)
    if not logits.requires_grad and one_pass:  # nothing to differentiate: no gradient writes
        results = call_op(_loss_one_pass, _loss_one_pass_impl, *args, False)
    else:
        results = LensLoss.apply(*args, one_pass, options.inplace_backward, options.inv_temperature, options.backend)
    return named_results(results, advantages, ref)


def named_results(results, advantages: Optional[Tensor], ref: Optional[Tensor]) -> dict:
    """A loss op's results as a dict of :data:`_RESULTS`, with None for what the call has not:
    the calibration outputs with caller-given ``advantages`` (which are returned instead),
    ``kl`` without ``ref``."""
    out = dict(zip(_RESULTS, results))
    if advantages is not None:
        for name in ("calibrated_rewards", "confidence", "difficulty", "negative_group_fraction"):
            out[name] = None
        out["advantages"] = advantages.detach()
    if ref is None:
        out["kl"] = None
    return out
