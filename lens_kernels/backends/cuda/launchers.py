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

from ...config import LENGTH_GAMMA_MIN_GAP, EpilogueResult, LossConfig
from ...groups import GroupLayout
from . import library


def _stream(tensor: torch.Tensor) -> Optional[int]:
    return torch.cuda.current_stream(tensor.device).cuda_stream if tensor.is_cuda else None


def _on_device(tensor: torch.Tensor):
    """Make the tensor's device current, so the kernels run where the stream lives."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _require(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if tensor.dtype != dtype or not tensor.is_contiguous():
        raise ValueError(f"{name}: the cuda launchers need a contiguous {dtype} tensor, got {tensor.dtype} "
                         f"with strides {tensor.stride()}")
    return tensor


def logprobs_forward(
    logits: torch.Tensor, target_ids: torch.Tensor, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, lse)``, both ``[B, T]`` fp32: one block per row, logits read once."""
    batch, length, vocab = logits.shape
    _require("target_ids", target_ids, torch.int64)
    logp = torch.empty((batch, length), dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    with _on_device(logits):
        code = library.load().lk_logprobs_forward(
            logits.data_ptr(), library.DTYPES[logits.dtype], batch, length, vocab, *logits.stride(),
            target_ids.data_ptr(), float(inv_temperature), logp.data_ptr(), lse.data_ptr(), _stream(logits),
        )
    library.check(code, "logprobs_forward")
    return logp, lse


def logprobs_backward(
    grad_logp: torch.Tensor,
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    lse: torch.Tensor,
    inv_temperature: float,
    inplace: bool,
) -> torch.Tensor:
    """d loss / d logits in ``logits.dtype``: a new contiguous tensor, or ``logits`` itself
    overwritten when ``inplace``."""
    batch, length, vocab = logits.shape
    _require("grad_logp", grad_logp, torch.float32)
    _require("target_ids", target_ids, torch.int64)
    _require("lse", lse, torch.float32)
    grad = logits if inplace else torch.empty((batch, length, vocab), dtype=logits.dtype, device=logits.device)
    with _on_device(logits):
        code = library.load().lk_logprobs_backward(
            grad_logp.data_ptr(), logits.data_ptr(), library.DTYPES[logits.dtype], batch, length, vocab,
            *logits.stride(), target_ids.data_ptr(), lse.data_ptr(), float(inv_temperature),
            grad.data_ptr(), *grad.stride(), _stream(logits),
        )
    library.check(code, "logprobs_backward")
    return grad


def _config(cfg: LossConfig, has_ref: bool) -> library.EpilogueConfig:
    return library.EpilogueConfig(
        mode=library.MODES[cfg.mode],
        loss_agg_mode=library.LOSS_AGG_MODES[cfg.loss_agg_mode],
        scale_by_std=int(cfg.scale_by_std),
        has_clip_ratio_c=int(cfg.clip_ratio_c is not None),
        has_length_gamma=int(cfg.length_gamma is not None),
        has_ref=int(has_ref),
        alpha=cfg.alpha,
        eps_low=cfg.eps_low,
        eps_high=cfg.eps_high,
        clip_ratio_c=cfg.clip_ratio_c or 0.0,
        beta=cfg.beta,
        std_eps=cfg.std_eps,
        length_gamma=cfg.length_gamma or 0.0,
        length_gamma_min_gap=LENGTH_GAMMA_MIN_GAP,
    )


def epilogue_forward(
    logp: torch.Tensor,
    old: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    groups: GroupLayout,
    ref: Optional[torch.Tensor],
    cfg: LossConfig,
) -> EpilogueResult:
    """SPEC steps 3-9 in five small kernels; returns the loss and ``dlogp = d loss / d logp``."""
    batch, length = logp.shape
    for name, tensor in (("logp", logp), ("old", old), ("mask", mask), ("rewards", rewards), ("ref", ref)):
        if tensor is not None:
            _require(name, tensor, torch.float32)
    for name in ("order", "start", "size"):
        _require(f"groups.{name}", getattr(groups, name), torch.int64)
    lib = library.load()
    device = logp.device
    scalar = lambda: torch.empty((), dtype=torch.float32, device=device)  # noqa: E731
    rows = lambda: torch.empty((batch,), dtype=torch.float32, device=device)  # noqa: E731
    loss, negative_fraction, clip_fraction = scalar(), scalar(), scalar()
    kl = scalar() if ref is not None else None
    dlogp = torch.empty((batch, length), dtype=torch.float32, device=device)
    advantages, calibrated, confidence = rows(), rows(), rows()
    difficulty = torch.empty((groups.num_groups,), dtype=torch.float32, device=device)
    workspace = torch.empty(
        (lib.lk_epilogue_workspace_size(batch, groups.num_groups),), dtype=torch.float64, device=device
    )
    config = _config(cfg, ref is not None)
    pointer = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    with _on_device(logp):
        code = lib.lk_epilogue_forward(
            logp.data_ptr(), old.data_ptr(), mask.data_ptr(), pointer(ref), rewards.data_ptr(),
            batch, length, groups.order.data_ptr(), groups.start.data_ptr(), groups.size.data_ptr(),
            groups.num_groups, ctypes.byref(config),
            loss.data_ptr(), dlogp.data_ptr(), advantages.data_ptr(), calibrated.data_ptr(),
            confidence.data_ptr(), difficulty.data_ptr(), negative_fraction.data_ptr(),
            clip_fraction.data_ptr(), pointer(kl), workspace.data_ptr(), _stream(logp),
        )
    library.check(code, "epilogue_forward")
    return EpilogueResult(
        loss=loss,
        dlogp=dlogp,
        advantages=advantages,
        calibrated_rewards=calibrated,
        confidence=confidence,
        difficulty=difficulty,
        negative_group_fraction=negative_fraction,
        clip_fraction=clip_fraction,
        kl=kl,
    )
