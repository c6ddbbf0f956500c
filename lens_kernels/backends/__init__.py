"""Backends of the fused LENS loss and how one is chosen.

Every backend is a module that implements the same four launchers. The math they implement
is ``lens_kernels.reference`` (SPEC section 1); the arguments were validated at the public
boundary (``lens_kernels.validation``) before any launcher runs, so launchers only assert
what their kernels rely on.

``logprobs_forward(logits, target_ids, inv_temperature) -> (logp, lse)``
    logits ``[B, T, V]`` fp32/bf16/fp16 with any strides; target_ids ``[B, T]`` int64
    contiguous.  Returns ``logp`` and ``lse``, both ``[B, T]`` fp32 contiguous, where
    ``lse = logsumexp_v(logits * inv_temperature)`` and ``logp = z[target] - lse``.

``logprobs_backward(grad_logp, logits, target_ids, lse, inv_temperature, inplace) -> grad``
    grad_logp ``[B, T]`` fp32 contiguous.  Writes
    ``grad[b, t, v] = grad_logp[b, t] * inv_temperature * (1[v == target] - exp(z - lse))``
    in ``logits.dtype``; rows with ``grad_logp == 0`` get exact zeros (their logits are not
    read).  With ``inplace=True`` the gradient goes into ``logits``' storage and ``logits`` is
    returned; otherwise a new contiguous tensor is returned.

``epilogue_forward(logp, old, mask, rewards, groups, ref, cfg) -> EpilogueResult``
    SPEC steps 3-9 on ``[B, T]`` fp32 inputs (``mask`` is fp32 0/1, ``ref`` may be None),
    ``groups`` a :class:`lens_kernels.groups.GroupLayout`, ``cfg`` a
    :class:`lens_kernels.config.LossConfig`.  Returns the loss and ``dlogp = d loss / d logp``
    (the epilogue's backward is ``grad_loss * dlogp``), plus the per-row/group outputs.
    The torch backend instead provides ``epilogue`` with the same arguments, plain PyTorch
    differentiable in ``logp`` (``dlogp`` None): autograd and ``torch.compile`` see through it.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "torch", "cuda")

_MODULES = {
    "torch": "lens_kernels.backends.torch_backend",
    "triton": "lens_kernels.backends.triton",
    "cuda": "lens_kernels.backends.cuda",
}


def get(name: str) -> ModuleType:
    """The module implementing backend ``name`` (one of ``torch``, ``triton``, ``cuda``)."""
    return importlib.import_module(_MODULES[name])


def is_available(name: str, device: torch.device | None = None) -> bool:
    """Whether backend ``name`` can run on ``device`` here (imports, toolchain, device kind)."""
    if name == "torch":
        return True
    try:
        module = get(name)
    except ImportError:
        return False
    return module.is_available(device)


@torch.compiler.assume_constant_result
def _resolve(name: str, device_type: str, device_index: int) -> str:
    """``resolve`` on plain values, evaluated once and kept as a constant by
    ``torch.compile`` (it imports modules, which Dynamo does not trace); "" = unavailable."""
    device = torch.device(device_type, device_index) if device_index >= 0 else torch.device(device_type)
    if name == "auto":
        return "triton" if device_type == "cuda" and is_available("triton", device) else "torch"
    return name if is_available(name, device) else ""


def resolve(name: str, device: torch.device) -> str:
    """Turn ``"auto"`` into a concrete backend for ``device``; check an explicit choice."""
    index = -1 if device.index is None else device.index
    resolved = _resolve(name, device.type, index)
    if not resolved:
        raise ValueError(
            f"backend: {name!r} is not available for tensors on {device} "
            f"(available here: {[b for b in _MODULES if is_available(b, device)]})"
        )
    return resolved
