"""``impl_backend=lens``: verl's fused actor/reference forward computes log-probs and entropy
with :func:`lens_kernels.fused_linear_token_logprobs`.

With ``actor_rollout_ref.model.use_fused_kernels=True`` verl's FSDP engine replaces the model's
forward by one that never builds the ``[B, T, V]`` logits: it hands the last hidden states,
``lm_head.weight`` and the shifted input ids to ``FusedLinearForPPO(impl_backend=...)``
(verl/utils/experimental/torch_functional.py), whose ``forward(hidden_states, vocab_weights,
input_ids, temperature)`` returns ``(log_probs, entropy)``. ``impl_backend`` is
``actor_rollout_ref.model.fused_kernel_options.impl_backend``, which the engine hands to
``patch_forward_with_backends`` (verl/models/transformers/monkey_patch.py): ``torch`` and
``liger`` get that forward, ``triton`` one calling verl's own Triton kernel.

On verl 0.9.1 (:data:`FUSED_VERSIONS`), two names are wrapped where verl binds them (see
:func:`patches_for`):

- ``patch_forward_with_backends``: ``impl_backend=lens`` installs verl's own torch-backend
  forward for the model type (dense text models, Qwen2/3-VL, GLM-4V, Qwen3.5) and marks the
  model ``lens``; any other backend goes to verl unchanged.
- ``FusedLinearForPPO``: a subclass that also accepts ``impl_backend="lens"`` and then runs
  :func:`fused_logprobs_entropy`; ``torch`` and ``liger`` run verl's code.

verl 0.9.0, recognised for the advantage estimators, builds ``FusedLinearForPPO()`` with no
backend: there ``impl_backend=lens`` raises a ``ValueError`` naming the option when the model is
patched, and torch/triton pass through. On a verl that :mod:`._verl_compat` does not recognise
nothing is wrapped (the plugin warns once) and verl's own backends stay as they are.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import torch

from ..linear_api import fused_linear_token_logprobs
from . import _verl_compat

#: the value of ``fused_kernel_options.impl_backend`` that selects this package
BACKEND = "lens"
#: the verl backend whose model forward ``lens`` reuses (it calls ``FusedLinearForPPO``)
FORWARD_OF = "torch"
#: verl releases whose model forwards pass ``impl_backend`` to ``FusedLinearForPPO`` (0.9.0's
#: build it with no argument and know only torch and triton)
FUSED_VERSIONS = ("0.9.1",)
MONKEY_PATCH_MODULE = "verl.models.transformers.monkey_patch"
TORCH_FUNCTIONAL_MODULE = "verl.utils.experimental.torch_functional"

logger = logging.getLogger(__name__)


def fused_logprobs_entropy(
    hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor, temperature: Any = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's ``FusedLinearForPPO.forward`` contract, computed by this package.

    ``hidden_states [B, T, d]`` (verl's padded layout; remove-padding passes ``[1, N, d]``) or
    packed ``[N, d]``, ``vocab_weights [V, d]`` (``lm_head.weight``), ``input_ids`` of
    hidden's leading shape (the shifted labels, any integer dtype), ``temperature`` a number
    -> ``(log_probs, entropy)``, both fp32 of hidden's leading shape and both differentiable in
    ``hidden_states`` and ``vocab_weights`` (verl's torch backend returns the entropy in the
    logits' dtype; here it stays fp32).

    Under autocast (verl's FSDP engine runs the forward in it), ``hidden_states`` and
    ``vocab_weights`` are cast to the autocast dtype, as autocast casts the ``hidden @ W.T`` of
    verl's own backends, and the call itself runs with autocast off. The target ids are the
    model's own input ids shifted by one, already used as indices by the embedding, so the id
    range is not checked again (``check_values=False``: no host sync).
    """
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden_states, vocab_weights = hidden_states.to(dtype), vocab_weights.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return fused_linear_token_logprobs(
            hidden_states, vocab_weights, input_ids.to(torch.int64), temperature=float(temperature),
            check_values=False, return_entropy=True,
        )


def wrap_fused_linear_class(original: type) -> type:
    """verl's ``FusedLinearForPPO`` -> a subclass that also accepts ``impl_backend="lens"``."""

    class FusedLinearForPPO(original):
        """verl's ``FusedLinearForPPO``; ``impl_backend="lens"`` runs :func:`fused_logprobs_entropy`."""

        def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
            lens = impl_backend == BACKEND
            super().__init__(chunk_size=chunk_size, impl_backend=FORWARD_OF if lens else impl_backend)
            if lens:
                self.impl_backend = BACKEND

        def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
            if self.impl_backend != BACKEND:
                return super().forward(hidden_states, vocab_weights, input_ids, temperature)
            return fused_logprobs_entropy(hidden_states, vocab_weights, input_ids, temperature)

    FusedLinearForPPO.__module__ = original.__module__
    FusedLinearForPPO.__qualname__ = original.__qualname__
    FusedLinearForPPO._lens_wrapped = True
    return FusedLinearForPPO


def wrap_patch_forward(original: Callable) -> Callable:
    """verl's ``patch_forward_with_backends`` -> one that also accepts ``fused_kernels_backend="lens"``."""

    @functools.wraps(original)
    def patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: str = None):
        if fused_kernels_backend != BACKEND:
            return original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)
        original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=FORWARD_OF)
        if use_fused_kernels:
            model._verl_fused_kernels_backend = BACKEND
            logger.info("lens-kernels: %s log-probs and entropy by lens_kernels.fused_linear_token_logprobs "
                        "(impl_backend=lens, verl's %s-backend forward)", type(model).__name__, FORWARD_OF)
        return None

    patch_forward_with_backends._lens_wrapped = True
    return patch_forward_with_backends


def wrap_patch_forward_refusing(original: Callable) -> Callable:
    """verl's ``patch_forward_with_backends`` -> one that refuses ``fused_kernels_backend="lens"``
    with an error naming the option (a verl whose ``FusedLinearForPPO`` has no backend switch)."""

    @functools.wraps(original)
    def patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: str = None):
        if use_fused_kernels and fused_kernels_backend == BACKEND:
            raise ValueError(
                f"actor_rollout_ref.model.fused_kernel_options.impl_backend={BACKEND}: needs verl "
                f"{', '.join(FUSED_VERSIONS)}, whose FusedLinearForPPO takes an impl_backend; this is verl "
                f"{_verl_compat.verl_version()}. Use impl_backend=torch (or triton) or upgrade verl."
            )
        return original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)

    patch_forward_with_backends._lens_wrapped = True
    return patch_forward_with_backends


def patches_for(version: str) -> dict:
    """``{module: (attribute, wrapper)}`` for :func:`._verl_compat.install`, on a verl release
    that it recognises: the ``lens`` backend on :data:`FUSED_VERSIONS`, else a clear refusal of it."""
    if version in FUSED_VERSIONS:
        return {MONKEY_PATCH_MODULE: ("patch_forward_with_backends", wrap_patch_forward),
                TORCH_FUNCTIONAL_MODULE: ("FusedLinearForPPO", wrap_fused_linear_class)}
    return {MONKEY_PATCH_MODULE: ("patch_forward_with_backends", wrap_patch_forward_refusing)}
