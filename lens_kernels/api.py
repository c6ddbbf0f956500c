"""The public loss functions: ``fused_lens_loss`` and ``token_logprobs``."""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from . import ops
from .backends import torch_backend
from .config import LensOptions
from .output import LensOutput
from .validation import LossInputs, ValueChecks, check_inplace, check_logits, check_backend, check_targets
from .validation import check_devices, check_temperature, validate_loss

_FINITE_HINT = "; pass check_values=False to get a non-finite loss instead"


def fused_lens_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    rewards: torch.Tensor,
    group_size: Optional[int] = None,
    group_index: Optional[torch.Tensor] = None,
    old_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    mode: str = "lens",
    alpha: float = 0.25,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_ratio_c: Optional[float] = None,
    temperature: float = 1.0,
    loss_agg_mode: str = "seq-mean-token-mean",
    scale_by_std: bool = True,
    std_eps: float = 1e-6,
    length_gamma: Optional[float] = None,
    backend: str = "auto",
    inplace_backward: bool = False,
    check_values: bool = True,
    advantages: Optional[torch.Tensor] = None,
) -> LensOutput:
    """The LENS (or GRPO) clipped-surrogate loss straight from logits.

    Shapes: ``logits [B, T, V]`` (fp32/bf16/fp16, any strides, e.g. ``model_logits[:, :-1]``),
    ``target_ids [B, T]`` int64 where ``logits[b, t]`` predicts ``target_ids[b, t]`` (any id,
    e.g. -100, at masked-out positions), ``completion_mask [B, T]`` (bool or 0/1),
    ``rewards [B]`` in ``[0, 1]``; groups are the contiguous runs of ``group_size`` rows or
    the labels ``group_index [B]`` (exactly one); ``old_logprobs`` / ``ref_logprobs [B, T]``
    optional (on-policy when ``old_logprobs`` is None).  The math is SPEC section 1
    (``lens_kernels.reference``).

    ``advantages [B]``: precomputed advantages (e.g. ``lens_advantages_from_stats`` over a
    batch gathered across ranks) that replace SPEC steps 3-7; groups are then not needed.

    ``backend``: ``"auto"`` (Triton on CUDA, torch otherwise), ``"triton"``, ``"torch"`` or
    ``"cuda"``.  On the GPU backends the loss takes one pass over the logits (the gradient is
    written during the forward) when the advantages are known before it: ``old_logprobs`` or
    ``advantages`` given, or ``mode="grpo"``; on-policy LENS takes two.  Masked-out rows are
    never read there; ``logprobs`` is 0 at masked-out positions on every backend.  No
    ``[B, T, V]`` fp32 buffer is ever made; the gradient is one buffer of the logits' shape
    and dtype, or none with ``inplace_backward=True`` (it then overwrites the logits' storage,
    during the forward on the one-pass path: use it only when nothing else reads the logits
    after the loss).

    ``check_values`` (default True) runs the checks that read tensor values: ids in range at
    masked positions, rewards in ``[0, 1]``, 0/1 masks, finite old/ref log-probs and
    advantages, finite log-probs at masked positions (non-finite logits).  They settle in one
    host sync after the kernels, and raise ``ValueError`` before the call returns.  With
    ``check_values=False`` the call never syncs (with ``group_size`` or ``advantages``;
    ``group_index`` needs one sync for its group count), so a forward+backward can be captured
    in a CUDA graph.  Under ``torch.compile`` the value checks are skipped.  What unchecked
    values give is the same on every backend and in ``lk.reference`` (never a finite loss made
    from a clamped value): a target id outside ``[0, V)`` at a masked position has log-prob
    NaN, so the loss is NaN (on-policy, its group's advantages too); a NaN reward, or a NaN or
    +inf old log-prob at a masked position, makes its group's advantages and the loss NaN (the
    group counts as mixed); non-finite ``advantages`` make the loss non-finite; rewards
    outside ``[0, 1]`` and log-probs above 0 enter the formulas as given; any nonzero mask
    value marks a completion token; a one-row group (``group_index``) gets advantage NaN when
    mixed (its std is 0 / 0) and 0 when negative; ``ref_logprobs`` so large that
    ``exp(ref - logp)`` overflows give ``kl`` = +inf (and, with ``beta > 0``, loss +inf).

    Extreme values the checks accept stay finite: a token on the clipped side (or past the
    dual-clip cap, or with advantage 0) contributes exactly 0 to the gradient even when its
    ratio ``exp(logp - old)`` overflows (``old_logprobs`` down to -1e30), and ``ref_logprobs``
    down to -1e30 give a finite k3; only a negative-advantage token on the unclipped side
    with an overflowing ratio (no ``clip_ratio_c``) makes the loss +inf, as its true value is.

    Returns a :class:`LensOutput`: ``loss`` (0-dim, differentiable), ``logprobs [B, T]``,
    ``advantages``, ``calibrated_rewards`` and ``confidence`` ``[B]``, ``difficulty
    [num_groups]``, and the 0-dim metrics ``negative_group_fraction``, ``clip_fraction``,
    ``kl`` (None without ``ref_logprobs``).

    An empty batch (``B = 0``, with ``group_size`` or ``group_index``) is legal: the loss and
    every metric are 0 (never NaN) and the per-row/group outputs are empty.  Logits that do
    not require grad give the loss with no gradient: a ``UserWarning`` says so once per
    process (``loss.backward()`` would then fail with PyTorch's own error).
    """
    inputs, options, checks = validate_loss(
        logits, target_ids, completion_mask, rewards, group_size, group_index, old_logprobs, ref_logprobs,
        advantages,
        dict(beta=beta, mode=mode, alpha=alpha, eps_low=eps_low, eps_high=eps_high, clip_ratio_c=clip_ratio_c,
             temperature=temperature, loss_agg_mode=loss_agg_mode, scale_by_std=scale_by_std, std_eps=std_eps,
             length_gamma=length_gamma, backend=backend, inplace_backward=inplace_backward,
             check_values=check_values),
    )
    _warn_no_grad(logits)
    if options.backend == "torch":
        out = _torch_loss(inputs, options)
    else:
        out = LensOutput(**ops.kernel_loss_forward(
            inputs.logits, inputs.target_ids, live_mask(inputs.mask), inputs.rewards, inputs.old, inputs.ref,
            inputs.advantages, inputs.groups, options,
        ))
        out.logprobs = out.logprobs.detach()
    checks.finite("logits", out.logprobs, inputs.mask, _FINITE_HINT)
    checks.settle()
    return out


_WARNED_NO_GRAD = False


def _warn_no_grad(logits: torch.Tensor) -> None:
    """Warn once per process when the loss cannot be differentiated (logits without grad)."""
    global _WARNED_NO_GRAD
    if _WARNED_NO_GRAD or logits.requires_grad or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    _WARNED_NO_GRAD = True
    warnings.warn(
        "fused_lens_loss: logits do not require grad, so the loss has no gradient "
        "(loss.backward() will fail); pass logits from a model with requires_grad, or ignore "
        "this for evaluation (shown once per process)",
        UserWarning, stacklevel=3,
    )


def live_mask(mask: torch.Tensor) -> torch.Tensor:
    """The completion mask as the kernels read it: bool (one byte, 0/1; no copy for a bool mask)."""
    return mask if mask.dtype == torch.bool else mask != 0


def _torch_loss(inputs: LossInputs, options: LensOptions) -> LensOutput:
    """The torch backend: chunked vocabulary pass, then the reference epilogue (autograd)."""
    logp, _ = ops.token_logprobs(inputs.logits, inputs.target_ids, options)
    work = logp.dtype  # fp32 (float64 for float64 logits)
    device = logp.device
    old = logp.detach() if inputs.old is None else inputs.old.to(work)
    groups = None if inputs.groups is None else inputs.groups.tensors(device)
    result = torch_backend.epilogue(
        logp, old, inputs.mask, inputs.rewards.to(work), groups,
        None if inputs.ref is None else inputs.ref.to(work), options,
        None if inputs.advantages is None else inputs.advantages.to(work),
    )
    return LensOutput.from_epilogue(result, torch.where(live_mask(inputs.mask), logp.detach(), 0))


def token_logprobs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    temperature: float = 1.0,
    backend: str = "auto",
    inplace_backward: bool = False,
    check_values: bool = True,
    return_entropy: bool = False,
):
    """Per-token log-probs ``log softmax(logits / temperature)[target]``.

    ``logits [B, T, V]`` (any strides), ``target_ids [B, T]`` int64 in ``[0, V)`` -> ``[B, T]``;
    or packed tokens: ``logits [N, V]``, ``target_ids [N]`` -> ``[N]``.  fp32 (float64 for
    float64 logits, torch backend), differentiable in ``logits``; no ``[B, T, V]`` fp32 buffer
    is made.  ``check_values`` (default True) checks the id range (one host sync); with
    ``check_values=False`` an id outside ``[0, V)`` gives NaN on every backend, and its
    gradient has no one-hot term (``-g * softmax``).

    ``return_entropy=True`` returns ``(logp, entropy)``: ``entropy = -sum_v p_v log p_v`` of
    ``p = softmax(logits / temperature)`` per token, same shape and dtype, computed in the same
    vocabulary pass and differentiable too (``d H / d z_v = -p_v (log p_v + H)``); when no
    gradient reaches the entropy its backward costs nothing extra.
    """
    check_logits(logits, packed=True)
    check_devices("the logits'", logits=logits, target_ids=target_ids)
    checks = ValueChecks(check_values)
    check_targets(target_ids, logits, None, checks)
    options = LensOptions(
        temperature=check_temperature(temperature), backend=check_backend(backend, logits),
        inplace_backward=check_inplace(inplace_backward, logits), check_values=check_values,
    )
    if not isinstance(return_entropy, bool):
        raise ValueError(f"return_entropy: expected True or False, got {return_entropy!r}")
    checks.settle()
    logp, entropy = ops.token_logprobs(logits, target_ids, options, return_entropy)
    return (logp, entropy) if return_entropy else logp
