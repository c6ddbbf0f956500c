"""Backends of the fused LENS loss and how one is chosen.

The math is ``lens_kernels.reference`` (SPEC section 1); arguments were validated at the public
boundary (``lens_kernels.validation``) before any launcher runs, so launchers only assert what
their kernels rely on.  Options arrive as one :class:`lens_kernels.config.LensOptions`.

Every backend provides the vocabulary pass (the ``token_logprobs`` op, the torch backend's
loss and the fused-linear row blocks use it).  Rows are ``[B, T]``; packed tokens ``[N]`` are
handed over as ``[1, N, V]`` (or ``[N, 1, V]``): the kernels know no other layout.

``inv_temperature`` is the float64 ``1 / temperature`` (a Python float); the launchers split it
into fp32 parts ``(hi, lo) = config.split_float(inv_temperature)`` and scale every logit as
``z = fma(x, hi, x * lo)`` (unbiased: ``x * fp32(1/t)`` would bias every fp32 log-prob the same
way); float64 logits (torch backend) use ``hi = 1/t``, ``lo = 0``.  Gradients carry ``hi``.

``logprobs_forward(logits, target_ids, inv_temperature, live=None, entropy=False) -> (logp, lse, ent)``
    logits ``[B, T, V]`` fp32/bf16/fp16, any strides; ``target_ids [B, T]`` int64; ``live``
    an optional bool ``[B, T]`` mask whose 0 rows are not read (their outputs are 0).
    Online over the row: max ``m``, ``s = sum exp(z - m)`` and, with ``entropy``,
    ``u = sum exp(z - m) (z - m)``.  ``logp = (z[target] - m) - log s`` and, when
    ``entropy=True``, ``ent = log s - u / s = -sum_v p_v log p_v`` (``p = softmax(z)``; ``-inf``
    logits add exactly 0), else ``ent`` is None (and not computed): ``[B, T]`` fp32 contiguous
    (float64 for float64 logits, torch backend).  ``lse = m + log s``, ``[B, T]`` float64 (both
    fp32 parts exactly, so that a near-certain token's ``1 - p`` survives the backward at
    ``|z| ~ 1e3``, which ``z - fp32(lse)`` rounds to the last place of ``lse``).

``logprobs_backward(grad_logp, logits, target_ids, lse, inv_temperature, inplace, grad_scale=None, grad_entropy=None, entropy=None)``
    ``grad[b, t, v] = grad_scale * inv_t * (g * (1[v == target] - p_v) - gh * p_v * (log p_v + ent))``
    with ``g = grad_logp [B, T]``, ``gh = grad_entropy [B, T]`` (both fp32; ``entropy`` the
    forward's ``ent``, required with ``grad_entropy``), ``log p_v = z_v - lse`` recomputed from
    the saved ``lse`` (float64 from the forward, split into fp32 ``hi + lo``: ``log p = (z - hi)
    - lo``; an fp32 ``lse`` is taken as ``hi``); ``grad_entropy=None`` runs the log-prob-only
    backward (no extra load or math).  ``grad_logp`` is required (zeros when only the entropy
    has a gradient).
    In ``logits.dtype`` (``grad_scale`` a 0-dim tensor read on the device, scaling both terms);
    rows where ``g`` and ``gh`` are both 0 get zeros without reading the logits; ``inplace``
    writes over ``logits`` (returned).

The GPU backends (triton, cuda) also provide the token kernels of the loss, which
``backends.kernel_loss`` sequences around the shared calibration of ``backends.common``:

``fused_loss(logits, target_ids, live, old, ref, advantages, weights, grad, options) -> (logp, parts)``
    the one-pass loss: log-prob, SPEC step 8 and the gradient of a row in one kernel.

``token_loss(logp, old, live, ref, advantages, weights, options) -> (dlogp, parts)``
    SPEC steps 8-9 on ``[B, T]`` log-probs (the two-pass path).

The torch backend instead runs the reference epilogue under autograd (``epilogue``).
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
    module = _LOADED.get(name)
    if module is None:
        module = _LOADED[name] = importlib.import_module(_MODULES[name])
    return module


_LOADED: dict[str, ModuleType] = {}  # get() once per call of the loss: no import machinery per call


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
            f"(available here: {[b for b in _MODULES if is_available(b, device)]}){_why(name, device)}"
        )
    return resolved


def _why(name: str, device: torch.device) -> str:
    """For ``"cuda"``: whether the compiled library was built and loads, and what it needs."""
    if name != "cuda":
        return ""
    try:
        from .cuda import library
        error = library.load_error()
    except ImportError as exc:  # pragma: no cover - the module itself fails to import
        error = str(exc)
    built = "the CUDA library is built and loads" if error is None else f"the CUDA library is not usable: {error}"
    needs = "" if device.type == "cuda" else "; it runs on CUDA tensors only"
    return f"; {built}{needs}"
