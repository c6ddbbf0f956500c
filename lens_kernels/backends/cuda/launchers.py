"""Launchers of the CUDA backend (contract: ``lens_kernels/backends/__init__.py``).

Each allocates its outputs with torch, hands data pointers, sizes and element strides to the C
ABI of csrc/ and enqueues the kernels on the current torch stream of the tensors' device.
Arguments were validated at the public boundary; the launchers only check the layouts the
kernels rely on.  (On CPU tensors they pass host pointers and no stream, which only a host
build of csrc/ can use: the emulation the tests run where no GPU is.)
"""
from __future__ import annotations

import contextlib
import ctypes
from typing import Optional

import torch

from ...config import LensOptions, split_float
from . import library


def _stream(tensor: torch.Tensor) -> Optional[int]:
    return torch.cuda.current_stream(tensor.device).cuda_stream if tensor.is_cuda else None


def _on_device(tensor: torch.Tensor):
    """Make the tensor's device current, so the kernels run where the stream lives."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _require(name: str, tensor: torch.Tensor, dtype: torch.dtype, contiguous: bool = True) -> torch.Tensor:
    if tensor.dtype != dtype or (contiguous and not tensor.is_contiguous()):
        raise ValueError(f"{name}: the cuda launchers need a {'contiguous ' if contiguous else ''}{dtype} tensor, "
                         f"got {tensor.dtype} with strides {tensor.stride()}")
    return tensor


def _fp32(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An optional ``[B, T]`` float input as the kernels read it (converted only when it is
    another dtype; the caller keeps the result alive until the launch)."""
    return None if tensor is None else tensor.to(torch.float32)


def _rows(tensor: Optional[torch.Tensor]) -> tuple:
    """``(pointer, stride_b, stride_t)`` of a ``[B, T]`` input, or ``(None, 0, 0)``."""
    if tensor is None:
        return None, 0, 0
    return (tensor.data_ptr(), *tensor.stride())


def _config(options: LensOptions, has_ref: bool) -> library.SurrogateConfig:
    return library.SurrogateConfig(
        has_clip_ratio_c=int(options.clip_ratio_c is not None),
        has_ref=int(has_ref),
        add_kl=int(has_ref and options.beta > 0),
        eps_low=options.eps_low,
        eps_high=options.eps_high,
        clip_ratio_c=options.clip_ratio_c or 0.0,
        beta=options.beta,
    )


def logprobs_forward(
    logits: torch.Tensor, target_ids: torch.Tensor, inv_temperature: float, live: Optional[torch.Tensor] = None,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(logp, lse, ent)``, ``[B, T]`` (``lse`` float64, the others fp32): one block per row,
    logits read once; ``ent`` (the softmax's entropy, from the same read) None unless
    ``entropy``; rows where ``live`` (bool ``[B, T]``) is 0 are not read and get 0."""
    batch, length, vocab = logits.shape
    _require("target_ids", target_ids, torch.int64, contiguous=False)
    logp = torch.empty((batch, length), dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp, dtype=torch.float64)
    ent = torch.empty_like(logp) if entropy else None
    with _on_device(logits):
        code = library.load().lk_logprobs_forward(
            logits.data_ptr(), library.DTYPES[logits.dtype], batch, length, vocab, *logits.stride(),
            target_ids.data_ptr(), *target_ids.stride(), *_rows(live), *split_float(inv_temperature),
            logp.data_ptr(), lse.data_ptr(), None if ent is None else ent.data_ptr(), _stream(logits),
        )
    library.check(code, "logprobs_forward")
    return logp, lse, ent


def logprobs_backward(
    grad_logp: torch.Tensor,
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    lse: torch.Tensor,
    inv_temperature: float,
    inplace: bool,
    grad_scale: Optional[torch.Tensor] = None,
    grad_entropy: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """d loss / d logits in ``logits.dtype`` from ``grad_logp`` (and ``grad_entropy`` with the
    forward's ``entropy``), times the 0-dim ``grad_scale`` read on the device: a new contiguous
    tensor, or ``logits`` itself overwritten when ``inplace``."""
    batch, length, vocab = logits.shape
    _require("grad_logp", grad_logp, torch.float32)
    _require("target_ids", target_ids, torch.int64, contiguous=False)
    lse = lse.to(torch.float64).contiguous()  # an fp32 logsumexp is taken as it is
    if grad_entropy is not None:
        _require("grad_entropy", grad_entropy, torch.float32)
        _require("entropy", entropy, torch.float32)
    scale = None if grad_scale is None else grad_scale.to(torch.float32)
    grad = logits if inplace else torch.empty((batch, length, vocab), dtype=logits.dtype, device=logits.device)
    with _on_device(logits):
        code = library.load().lk_logprobs_backward(
            grad_logp.data_ptr(), None if scale is None else scale.data_ptr(),
            None if grad_entropy is None else grad_entropy.data_ptr(),
            None if grad_entropy is None else entropy.data_ptr(), logits.data_ptr(),
            library.DTYPES[logits.dtype], batch, length, vocab, *logits.stride(),
            target_ids.data_ptr(), *target_ids.stride(), lse.data_ptr(), *split_float(inv_temperature),
            grad.data_ptr(), *grad.stride(), _stream(logits),
        )
    library.check(code, "logprobs_backward")
    return grad


def token_loss(
    logp: torch.Tensor,
    old: Optional[torch.Tensor],
    live: torch.Tensor,
    ref: Optional[torch.Tensor],
    advantages: torch.Tensor,
    weights: torch.Tensor,
    options: LensOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dlogp [B, T] fp32, parts [3, B] float64)``: SPEC steps 8-9, one block per row."""
    batch, length = logp.shape
    _require("logp", logp, torch.float32)
    _require("weights", weights, torch.float64, contiguous=False)
    dlogp = torch.empty_like(logp)
    parts = torch.empty((3, batch), dtype=torch.float64, device=logp.device)
    config = _config(options, ref is not None)
    old, ref, advantages = _fp32(old), _fp32(ref), advantages.to(torch.float64)
    with _on_device(logp):
        code = library.load().lk_token_loss(
            logp.data_ptr(), *_rows(old), *_rows(live), *_rows(ref), advantages.data_ptr(), advantages.stride(0),
            weights.data_ptr(), batch, length, ctypes.byref(config), dlogp.data_ptr(), parts.data_ptr(),
            _stream(logp),
        )
    library.check(code, "token_loss")
    return dlogp, parts


def fused_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    live: torch.Tensor,
    old: Optional[torch.Tensor],
    ref: Optional[torch.Tensor],
    advantages: torch.Tensor,
    weights: torch.Tensor,
    grad: Optional[torch.Tensor],
    options: LensOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp [B, T] fp32, parts [3, B*T] float64)``, and d loss / d logits written into
    ``grad`` (a new buffer or the logits; None: no gradient) in the same kernel."""
    batch, length, vocab = logits.shape
    _require("target_ids", target_ids, torch.int64, contiguous=False)
    _require("weights", weights, torch.float64, contiguous=False)
    logp = torch.empty((batch, length), dtype=torch.float32, device=logits.device)
    parts = torch.empty((3, batch * length), dtype=torch.float64, device=logits.device)
    config = _config(options, ref is not None)
    old, ref, advantages = _fp32(old), _fp32(ref), advantages.to(torch.float64)
    with _on_device(logits):
        code = library.load().lk_fused_loss(
            logits.data_ptr(), library.DTYPES[logits.dtype], batch, length, vocab, *logits.stride(),
            target_ids.data_ptr(), *target_ids.stride(), *_rows(live), *_rows(old), *_rows(ref),
            advantages.data_ptr(), advantages.stride(0), weights.data_ptr(), *options.inv_temperature_parts,
            ctypes.byref(config),
            None if grad is None else grad.data_ptr(), *((0, 0, 0) if grad is None else grad.stride()),
            logp.data_ptr(), parts.data_ptr(), _stream(logits),
        )
    library.check(code, "fused_loss")
    return logp, parts
