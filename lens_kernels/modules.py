"""``torch.nn.Module`` forms of the losses (Liger's convention): the options fixed and checked
at construction, the tensors given to ``forward``.

>>> loss_fn = lk.LensLoss(group_size=8, mode="lens", eps_high=0.28)
>>> out = loss_fn(logits, target_ids, completion_mask, rewards, old_logprobs=old)
>>> out.loss.backward()

The modules hold no parameters or buffers (``state_dict()`` is empty); ``repr`` shows every
option.  ``forward`` returns the :class:`~lens_kernels.LensOutput` of the function it wraps.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

from .api import fused_lens_loss
from .backends import BACKENDS
from .linear_api import fused_linear_lens_loss
from .linear_validation import LINEAR_BACKENDS, LINEAR_GEMMS
from .output import LensOutput
from .validation import loss_options

# The tensors of a call, given to forward; everything else of the function is an option.
_LOGITS_TENSORS = ("logits", "target_ids", "completion_mask", "rewards", "group_index", "old_logprobs",
                   "ref_logprobs", "advantages")
_LINEAR_TENSORS = ("hidden", "weight", "bias") + _LOGITS_TENSORS[1:]
_META = torch.empty((1, 1, 1), device="meta")  # stands in for the logits while the options are checked


def _options(owner: str, fn: Callable, tensors: tuple, given: dict, backends: tuple) -> dict:
    """``fn``'s keyword defaults updated with ``given``, checked: unknown names, tensors passed
    as options, and the values (as the function checks them; the backend's availability and
    anything that depends on the tensors are checked by each call)."""
    defaults = {name: p.default for name, p in inspect.signature(fn).parameters.items() if name not in tensors}
    for name in given:
        if name in tensors:
            raise TypeError(f"{owner}: {name} is a tensor of forward(), not an option")
        if name not in defaults:
            raise TypeError(f"{owner}: unknown option {name!r}; expected some of {sorted(defaults)}")
    options = {**defaults, **given}
    if options["backend"] not in backends:
        raise ValueError(f"backend: expected one of {list(backends)}, got {options['backend']!r}")
    group_size = options["group_size"]
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2):
        raise ValueError(f"group_size: expected an int >= 2 or None, got {group_size!r}")
    values = {name: options.get(name, False) for name in (
        "beta", "mode", "alpha", "eps_low", "eps_high", "clip_ratio_c", "temperature", "loss_agg_mode", "scale_by_std",
        "std_eps", "length_gamma", "backend", "inplace_backward", "check_values")}
    if not isinstance(values["inplace_backward"], bool):
        raise ValueError(f"inplace_backward: expected True or False, got {values['inplace_backward']!r}")
    loss_options(_META, True, {**values, "backend": "torch", "inplace_backward": False})
    return options


class _LossModule(torch.nn.Module):
    options: dict

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.options.items())


class LensLoss(_LossModule):
    """:func:`lens_kernels.fused_lens_loss` as a module.

    ``LensLoss(**options)`` takes the function's options by name (``group_size``, ``beta``,
    ``mode``, ``alpha``, ``eps_low``, ``eps_high``, ``clip_ratio_c``, ``temperature``,
    ``loss_agg_mode``, ``scale_by_std``, ``std_eps``, ``length_gamma``, ``backend``,
    ``inplace_backward``, ``check_values``; the function's defaults otherwise) and checks them
    once, here.  ``forward(logits [B, T, V], target_ids [B, T], completion_mask [B, T],
    rewards [B], group_index=None, old_logprobs=None, ref_logprobs=None, advantages=None)``
    returns the function's :class:`~lens_kernels.LensOutput` (``group_index [B]`` needs
    ``group_size=None``).
    """

    def __init__(self, **options) -> None:
        super().__init__()
        self.options = _options("LensLoss", fused_lens_loss, _LOGITS_TENSORS, options, BACKENDS)

    def forward(
        self,
        logits: torch.Tensor,
        target_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        rewards: torch.Tensor,
        group_index: Optional[torch.Tensor] = None,
        old_logprobs: Optional[torch.Tensor] = None,
        ref_logprobs: Optional[torch.Tensor] = None,
        advantages: Optional[torch.Tensor] = None,
    ) -> LensOutput:
        return fused_lens_loss(logits, target_ids, completion_mask, rewards, group_index=group_index,
                               old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, advantages=advantages,
                               **self.options)


class FusedLinearLensLoss(_LossModule):
    """:func:`lens_kernels.fused_linear_lens_loss` as a module: the loss of the logits
    ``hidden @ weight.T + bias``, never materialised.

    ``FusedLinearLensLoss(**options)`` takes the function's options by name (those of
    :class:`LensLoss` without ``inplace_backward``, plus ``gemm``) and checks them once, here.
    ``forward(hidden [B, T, d], weight [V, d], target_ids [B, T], completion_mask [B, T],
    rewards [B], bias=None, group_index=None, old_logprobs=None, ref_logprobs=None,
    advantages=None)`` returns the function's :class:`~lens_kernels.LensOutput`; gradients
    reach ``hidden``, ``weight`` and ``bias`` (e.g. an ``lm_head``'s, passed by the caller:
    the module owns no weight).
    """

    def __init__(self, **options) -> None:
        super().__init__()
        self.options = _options("FusedLinearLensLoss", fused_linear_lens_loss, _LINEAR_TENSORS, options,
                                LINEAR_BACKENDS)
        if self.options["gemm"] not in LINEAR_GEMMS:
            raise ValueError(f"gemm: expected one of {list(LINEAR_GEMMS)}, got {self.options['gemm']!r}")

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        target_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        rewards: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        group_index: Optional[torch.Tensor] = None,
        old_logprobs: Optional[torch.Tensor] = None,
        ref_logprobs: Optional[torch.Tensor] = None,
        advantages: Optional[torch.Tensor] = None,
    ) -> LensOutput:
        return fused_linear_lens_loss(hidden, weight, target_ids, completion_mask, rewards, bias=bias,
                                      group_index=group_index, old_logprobs=old_logprobs,
                                      ref_logprobs=ref_logprobs, advantages=advantages, **self.options)
