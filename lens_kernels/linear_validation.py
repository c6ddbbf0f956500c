"""Argument checks of the fused-linear entry points: ``hidden``, ``weight``, ``bias``,
``target_ids`` and the backend, each error naming the argument.  The loss options are checked
by :mod:`lens_kernels.validation`, as for ``fused_lens_loss``."""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import backends
from .validation import check_devices

LINEAR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LINEAR_BACKENDS = ("auto", "triton", "torch", "cuda")
LINEAR_GEMMS = ("auto", "library", "triton")


class LinearShape(NamedTuple):
    lead: tuple  # (B, T), or (N,) for packed tokens
    dim: int
    vocab: int

    @property
    def rows(self) -> int:
        """``N = B * T`` (or the packed ``N``): rows of the ``[N, d]`` view of hidden."""
        return self.lead[0] * self.lead[1] if len(self.lead) == 2 else self.lead[0]


def _is_tensor(name: str, value, form: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {form}, got {type(value).__name__}")
    return value


def check_linear(hidden, weight, bias, target_ids, packed: bool = False) -> LinearShape:
    """``hidden [B, T, d]`` (or, with ``packed``, also ``[N, d]``) and ``weight [V, d]`` of one
    floating dtype (fp32, bf16, fp16; float64 for the torch backend) on one device, ``bias [V]``
    of that dtype or None, ``target_ids`` int64 of hidden's leading shape (``[B, T]`` or
    ``[N]``; its id range is a value check, made with the loss's own checks)."""
    forms = "[B, T, d] or packed [N, d]" if packed else "[B, T, d]"
    _is_tensor("hidden", hidden, forms)
    if hidden.dim() not in ((2, 3) if packed else (3,)) or hidden.shape[-1] < 1:
        raise ValueError(f"hidden: expected shape {forms} with d >= 1, got {list(hidden.shape)}")
    if hidden.dtype not in LINEAR_DTYPES + (torch.float64,):
        raise TypeError(f"hidden: expected dtype float32, bfloat16 or float16, got {hidden.dtype}")
    lead, dim = tuple(hidden.shape[:-1]), hidden.shape[-1]
    check_devices("hidden's", hidden=hidden, weight=weight, bias=bias, target_ids=target_ids)
    _is_tensor("weight", weight, "[V, d]")
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != dim:
        raise ValueError(f"weight: expected shape [V, d] with V >= 1 and d = {dim} (hidden.shape[-1]), "
                         f"got {list(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected the dtype of hidden ({hidden.dtype}), got {weight.dtype}; "
                        "cast one of them (e.g. under autocast: weight.to(hidden.dtype))")
    vocab = weight.shape[0]
    if bias is not None:
        _is_tensor("bias", bias, "[V] or None")
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias: expected shape [{vocab}] (weight.shape[0]) or None, got {list(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias: expected the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
    _is_tensor("target_ids", target_ids, "[B, T] int64" if len(lead) == 2 else "[N] int64")
    if tuple(target_ids.shape) != lead:
        where = "hidden.shape[:2]; hidden[b, t] predicts target_ids[b, t]" if len(lead) == 2 else \
            "hidden.shape[:1], packed tokens; hidden[i] predicts target_ids[i]"
        raise ValueError(f"target_ids: expected shape {list(lead)} ({where}), got {list(target_ids.shape)}")
    if target_ids.dtype != torch.int64:
        raise TypeError(f"target_ids: expected dtype int64, got {target_ids.dtype}")
    return LinearShape(lead, dim, vocab)


def logits_stand_in(hidden: torch.Tensor, vocab: int) -> torch.Tensor:
    """A ``[B, T, V]`` (packed: ``[N, V]``) tensor with hidden's dtype and device and no
    storage (one element, expanded), so that the checks written for ``logits`` (target ids,
    mask, rewards, groups, options) validate the fused-linear arguments unchanged."""
    return hidden.new_empty(()).expand(*hidden.shape[:-1], vocab)


def check_linear_backend(backend, hidden: torch.Tensor) -> str:
    """``"auto"`` (Triton on CUDA where it runs, torch otherwise and for float64), ``"triton"``,
    ``"torch"`` or ``"cuda"`` (its row kernels between library GEMMs; no logit tiles)."""
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"backend: expected one of {list(LINEAR_BACKENDS)} for the fused-linear path, got {backend!r}")
    if backend == "auto":
        if hidden.dtype == torch.float64:
            return "torch"
        return backends.resolve("auto", hidden.device)
    if backend in ("triton", "cuda") and hidden.dtype == torch.float64:
        raise TypeError(f"hidden: float64 is supported by backend='torch' only, got backend={backend!r}")
    return backends.resolve(backend, hidden.device)


def check_linear_gemm(gemm, backend: str) -> str:
    """``"auto"``, ``"library"`` (the GEMMs by ``torch.mm``, i.e. cuBLAS, on blocks of rows) or
    ``"triton"`` (Triton GEMMs that skip rows needing no work: the logit tiles, or the one
    pass's block GEMMs); ``backend`` is the resolved backend, and ``"triton"`` needs the Triton one."""
    if gemm not in LINEAR_GEMMS:
        raise ValueError(f"gemm: expected one of {list(LINEAR_GEMMS)}, got {gemm!r}")
    if gemm == "triton" and backend != "triton":
        raise ValueError(f"gemm: 'triton' (Triton GEMMs) needs backend='triton', got backend={backend!r}")
    return gemm
