"""Public fused-linear functions: log-probs and the LENS loss straight from the hidden states
and the output (``lm_head``) weight, never materialising the ``[B, T, V]`` logits."""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import linear_ops
from .api import live_mask
from .backends import torch_backend
from .backends.kernel_loss import one_pass_applies
from .config import LensOptions
from .linear_validation import check_linear, check_linear_backend, check_linear_gemm, logits_stand_in
from .output import LensOutput
from .validation import LossInputs, ValueChecks, check_mask, check_targets, check_temperature, validate_loss

_FINITE_HINT = "; pass check_values=False to get a non-finite loss instead"


def fused_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    temperature: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
    check_values: bool = True,
    gemm: str = "auto",
    completion_mask: Optional[torch.Tensor] = None,
    return_entropy: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``log softmax((hidden @ weight.T + bias) / temperature)[target]`` without the logits.

    ``hidden [B, T, d]`` (the last hidden states, already shifted so that ``hidden[b, t]``
    predicts ``target_ids[b, t]``) or packed ``[N, d]`` (sequences concatenated, e.g. verl's
    remove-padding or TRL's padding-free layout), ``weight [V, d]`` and ``bias [V]``
    (optional) of the same dtype (fp32, bf16 or fp16; float64 with ``backend="torch"``),
    ``target_ids [B, T]`` / ``[N]`` int64 in ``[0, V)`` -> ``[B, T]`` / ``[N]`` fp32 (float64
    for float64 inputs): outputs follow the input's layout.  Differentiable in ``hidden``,
    ``weight`` and ``bias``; under ``torch.no_grad()`` it is the sampler-side "old log-probs"
    pass.  ``check_values=False`` skips the id-range check (no host sync); an id outside
    ``[0, V)`` then gives NaN on every path.
    ``completion_mask [B, T]`` / ``[N]`` (bool or 0/1, optional): the log-prob (and entropy)
    is 0 where it is not set, with no gradient (ids there may be anything, e.g. -100), and the
    Triton tiles skip those positions (the rows in the mask are packed first), the torch
    backend too: padding and prompts cost no FLOPs.

    ``return_entropy=True`` returns ``(logp, entropy)``: ``entropy = -sum_v p_v log p_v`` of
    ``p = softmax((hidden @ weight.T + bias) / temperature)`` per token, same shape and dtype
    as ``logp``, made in the same pass over the vocabulary (no extra GEMM, no second read of
    the logits).  Both are differentiable (``d H / d z_v = -p_v (log p_v + H)``, combined with
    the log-prob's gradient in the same recomputation GEMMs); when nothing asks for the
    entropy's gradient (e.g. it is only logged) the backward costs what it costs without it.

    ``backend``: ``"auto"`` (Triton on CUDA, torch otherwise), ``"triton"``, ``"cuda"`` (the
    csrc/ row kernels; ``gemm`` is then always ``"library"``) or ``"torch"``.
    ``gemm`` (Triton backend): ``"triton"`` (the default for this function, ``"auto"``): Triton
    logit tiles, never stored, the backward recomputing them; ``"library"``: the logits of
    blocks of rows by ``torch.mm`` (cuBLAS) into one 512 MiB buffer, read back by the row
    kernels.  Memory: the forward keeps ``O(N)`` floats besides its inputs (plus ``3 N V /
    2048`` fp32 partials with Triton tiles, 4 with the entropy, or the block buffer); the
    backward holds one vocabulary chunk (tiles) or row block (library) of the logits' gradient
    at a time (at most 512 MiB) and, with tiles, an fp32 ``[N, d]`` accumulator.
    """
    shape = check_linear(hidden, weight, bias, target_ids, packed=True)
    checks = ValueChecks(check_values)
    if completion_mask is not None:
        completion_mask = live_mask(check_mask(completion_mask, shape.lead, hidden.device, checks, "hidden's"))
    check_targets(target_ids, logits_stand_in(hidden, shape.vocab), completion_mask, checks)
    temperature = check_temperature(temperature)
    backend = check_linear_backend(backend, hidden)
    gemm = check_linear_gemm(gemm, backend)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy: expected a bool, got {type(return_entropy).__name__}")
    checks.settle()
    result = linear_ops.linear_token_logprobs(
        hidden.reshape(shape.rows, shape.dim), weight, bias, target_ids.reshape(-1), temperature, _path(backend, gemm),
        None if completion_mask is None else completion_mask.reshape(-1), entropy=return_entropy,
    )
    if return_entropy:
        return result[0].view(shape.lead), result[1].view(shape.lead)
    return result.view(shape.lead)


def fused_linear_lens_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    rewards: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
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
    check_values: bool = True,
    advantages: Optional[torch.Tensor] = None,
    gemm: str = "auto",
) -> LensOutput:
    """``fused_lens_loss`` of the logits ``hidden @ weight.T + bias``, which are never made.

    ``hidden [B, T, d]``, ``weight [V, d]``, ``bias [V]`` as in
    :func:`fused_linear_token_logprobs` (``[B, T, d]`` only: confidences and groups are per
    sequence, which a packed ``[N, d]`` does not delimit); every other argument, the options
    and the returned :class:`LensOutput` are those of :func:`lens_kernels.fused_lens_loss`
    (there are no logits to overwrite, so no ``inplace_backward``).  ``loss.backward()`` gives gradients to
    ``hidden``, ``weight`` and ``bias``; a weight shared with the input embedding (tied
    embeddings) receives both gradients through autograd.  ``logprobs`` is 0 at masked-out
    positions.

    Paths (``backend="triton"``, the default on CUDA):

    * one pass, when every token's coefficient is known before the vocabulary pass
      (``old_logprobs`` or ``advantages`` given, or ``mode="grpo"``): the rows are taken in
      blocks whose ``[n, V]`` logits fit in 512 MiB; per block one GEMM makes the logits, one
      kernel computes the loss terms and overwrites them with ``d loss / d logits``, and two
      GEMMs add the block's share of ``dh`` and ``dW`` (three GEMMs in all; the ``dW`` GEMM is
      skipped for a frozen weight, the ``dh`` one for hidden states that do not require grad).
      ``loss.backward()`` only scales the gradients by ``grad_output``.  ``dW`` is summed over
      the blocks in the weight's dtype (one rounding per block of ~1.7k rows at V=151936 in
      bf16).  ``gemm="library"`` or ``"auto"``: the GEMMs by cuBLAS over every row;
      ``gemm="triton"``: Triton GEMMs that skip row tiles with no completion token (logits)
      or no nonzero coefficient (``dh``, ``dW``: padding, zero-advantage groups), for batches
      with much padding or many such groups.
    * recompute (on-policy LENS, whose confidences need the whole batch's log-probs first):
      with ``gemm="triton"`` or ``"auto"``, Triton logit tiles, never stored: the forward
      keeps only per-row logsumexps, the backward recomputes the tiles (four GEMMs in all; row
      tiles with no completion token skipped in the forward one, row blocks with a zero
      gradient in the three backward ones); with ``gemm="library"``, cuBLAS row blocks
      recomputed in the backward (four GEMMs, no skipping).

    ``backend="cuda"``: the same two paths with the csrc/ row kernels between the cuBLAS GEMMs
    (no Triton tiles).  ``backend="torch"`` (any device, float64 too): chunked matmuls with
    bounded temporaries, and the reference epilogue under autograd.
    """
    (batch, length), dim, vocab = check_linear(hidden, weight, bias, target_ids)
    linear_backend = check_linear_backend(backend, hidden)
    gemm = check_linear_gemm(gemm, linear_backend)
    inputs, options, checks = validate_loss(
        logits_stand_in(hidden, vocab), target_ids, completion_mask, rewards, group_size, group_index,
        old_logprobs, ref_logprobs, advantages,
        dict(beta=beta, mode=mode, alpha=alpha, eps_low=eps_low, eps_high=eps_high, clip_ratio_c=clip_ratio_c,
             temperature=temperature, loss_agg_mode=loss_agg_mode, scale_by_std=scale_by_std, std_eps=std_eps,
             length_gamma=length_gamma, backend=linear_backend, inplace_backward=False, check_values=check_values),
        whose="hidden's",
    )
    flat = hidden.reshape(batch * length, dim)
    one_pass = one_pass_applies(options, inputs.old is not None, inputs.advantages is not None)
    if linear_backend != "torch" and one_pass:
        out = LensOutput(**linear_ops.linear_loss_one_pass(
            flat, weight, bias, inputs.target_ids, live_mask(inputs.mask), inputs.rewards, inputs.old, inputs.ref,
            inputs.advantages, inputs.groups, options, "triton" if gemm == "triton" else "library",
        ))
        logp = out.logprobs
    else:
        logp = linear_ops.linear_token_logprobs(
            flat, weight, bias, target_ids.reshape(-1), options.temperature, _path(linear_backend, gemm),
            live_mask(inputs.mask).reshape(-1),
        ).view(batch, length)
        out = _recompute_loss(logp, inputs, options)
    checks.finite("hidden/weight", logp.detach(), inputs.mask, _FINITE_HINT)
    checks.settle()
    return out


def _path(backend: str, gemm: str) -> str:
    """The vocabulary-pass launchers (``linear_ops``) of a resolved backend and ``gemm``."""
    if backend == "torch":
        return "torch"
    if backend == "cuda" or gemm == "library":
        return f"blocks:{backend}"
    return "tiles"


def _recompute_loss(logp: torch.Tensor, inputs: LossInputs, options: LensOptions) -> LensOutput:
    """The loss of differentiable log-probs ``logp [B, T]`` through the reference epilogue
    (torch ops, under autograd): the backward reaches the fused-linear op, which recomputes
    the logits (four GEMMs in all)."""
    work = logp.dtype
    result = torch_backend.epilogue(
        logp, logp.detach() if inputs.old is None else inputs.old.to(work), inputs.mask, inputs.rewards.to(work),
        None if inputs.groups is None else inputs.groups.tensors(logp.device),
        None if inputs.ref is None else inputs.ref.to(work), options,
        None if inputs.advantages is None else inputs.advantages.to(work),
    )
    return LensOutput.from_epilogue(result, torch.where(inputs.mask.bool(), logp, 0).detach())
