"""Argument checks of SPEC section 3, run once at the public boundary before any kernel.

Shape, dtype, device and option checks always run.  Checks that read tensor values (target id
range, reward range, mask values, group sizes under ``group_index``) need a host sync; they
run in eager mode and are skipped while ``torch.compile`` traces, where they would break the
graph.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import backends
from .config import LOSS_AGG_MODES, MODES, LossConfig
from .groups import GroupLayout, contiguous_groups, indexed_groups

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# float64 logits are an extension for debugging and gradcheck: torch backend only.
REFERENCE_DTYPES = LOGITS_DTYPES + (torch.float64,)


class Checked(NamedTuple):
    """What validation hands to the dispatcher."""

    groups: GroupLayout
    cfg: LossConfig
    backend: str


def _eager() -> bool:
    return not torch.compiler.is_compiling()


class ValueChecks:
    """Checks that read tensor values, gathered so that one host sync settles them all.

    ``add(bad, message)`` records a 0-dim bool tensor (True = invalid) and the error text (or
    a callable making it, run only on failure); ``settle()`` raises ``ValueError`` for the
    first invalid one.  Nothing is recorded while ``torch.compile`` traces.
    """

    def __init__(self) -> None:
        self._items: list = []

    def add(self, bad: torch.Tensor, message) -> None:
        if _eager():
            self._items.append((bad, message))

    def settle(self) -> None:
        if not self._items:
            return
        flags = torch.stack([bad for bad, _ in self._items]).tolist()
        for flag, (_, message) in zip(flags, self._items):
            if flag:
                raise ValueError(message() if callable(message) else message)
        self._items.clear()


def _tensor(name: str, value, shape: tuple, device: torch.device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {list(shape)}, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the logits' device), got {value.device}")
    return value


def _float_tensor(name: str, value, shape: tuple, device: torch.device) -> torch.Tensor:
    _tensor(name, value, shape, device)
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {value.dtype}")
    return value


def _number(name: str, value, low: float, high: float = math.inf, *, open_low=False, open_high=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    below = value <= low if open_low else value < low
    above = value >= high if open_high else value > high
    if below or above:
        left, right = "(" if open_low else "[", ")" if open_high else "]"
        raise ValueError(f"{name}: expected a value in {left}{low}, {high}{right}, got {value!r}")
    return float(value)


def _choice(name: str, value, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def check_logits(logits) -> torch.Tensor:
    """``logits``: a ``[B, T, V]`` fp32/bf16/fp16 tensor with ``V >= 1``."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor [B, T, V], got {type(logits).__name__}")
    if logits.dim() != 3 or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected shape [B, T, V] with V >= 1, got {list(logits.shape)}")
    if logits.dtype not in REFERENCE_DTYPES:
        raise TypeError(f"logits: expected dtype float32, bfloat16 or float16, got {logits.dtype}")
    return logits


def check_backend(backend, logits: torch.Tensor) -> str:
    """``backend``: a known name, available for the logits' device (float64 logits: torch,
    which ``"auto"`` then picks on any device)."""
    backend = _choice("backend", backend, backends.BACKENDS)
    if backend == "auto" and logits.dtype == torch.float64:
        return "torch"
    backend = backends.resolve(backend, logits.device)
    if logits.dtype not in LOGITS_DTYPES and backend != "torch":
        raise TypeError(f"logits: float64 is supported by backend='torch' only, got backend={backend!r}")
    return backend


def check_inplace(inplace_backward, logits: torch.Tensor) -> bool:
    """``inplace_backward`` needs logits whose elements do not share memory (an expanded or
    otherwise self-overlapping tensor would have several gradient writes race)."""
    if not inplace_backward:
        return False
    dims = sorted((stride, size) for stride, size in zip(logits.stride(), logits.shape) if size > 1)
    span = 1
    for stride, size in dims:
        if stride < span:
            raise ValueError(
                "inplace_backward: the logits' elements overlap in memory (strides "
                f"{tuple(logits.stride())} for shape {tuple(logits.shape)}); pass contiguous "
                "or sliced logits, or inplace_backward=False"
            )
        span = stride * size
    return True


def check_targets(target_ids, logits: torch.Tensor, checks: ValueChecks) -> torch.Tensor:
    """``target_ids``: int64 ``[B, T]`` with ``0 <= id < V``."""
    batch, length, vocab = logits.shape
    _tensor("target_ids", target_ids, (batch, length), logits.device)
    if target_ids.dtype != torch.int64:
        raise TypeError(f"target_ids: expected dtype int64, got {target_ids.dtype}")
    outside = (target_ids < 0) | (target_ids >= vocab)
    checks.add(
        outside.any(),
        lambda: f"target_ids: expected ids in [0, {vocab}) (V = logits.shape[-1]), found {target_ids[outside][0].item()}",
    )
    return target_ids


def check_temperature(temperature) -> float:
    return _number("temperature", temperature, 0.0, open_low=True)


def check_mask(completion_mask, shape: tuple, device: torch.device, checks: ValueChecks) -> torch.Tensor:
    """``completion_mask``: ``[B, T]`` bool, or numbers that are all 0 or 1."""
    _tensor("completion_mask", completion_mask, shape, device)
    if completion_mask.dtype != torch.bool:
        if completion_mask.is_complex():
            raise TypeError(f"completion_mask: expected bool or 0/1 numbers, got {completion_mask.dtype}")
        checks.add(
            ((completion_mask != 0) & (completion_mask != 1)).any(),
            "completion_mask: expected bool or values in {0, 1}, found other values",
        )
    return completion_mask


def check_rewards(rewards, batch: int, device: torch.device, checks: ValueChecks) -> torch.Tensor:
    """``rewards``: float ``[B]`` in ``[0, 1]``, no NaN."""
    _float_tensor("rewards", rewards, (batch,), device)
    checks.add(
        ~((rewards >= 0) & (rewards <= 1)).all(),
        "rewards: expected values in [0, 1] (binary or fractional), found values outside or NaN",
    )
    return rewards


def check_groups(group_size, group_index, batch: int, device: torch.device, checks: ValueChecks) -> GroupLayout:
    """Exactly one of ``group_size`` (``G >= 2`` dividing ``B``) and ``group_index`` (int64
    ``[B]``, every group at least 2 rows)."""
    if (group_size is None) == (group_index is None):
        raise ValueError("group_size / group_index: pass exactly one of the two")
    if group_index is None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise ValueError(f"group_size: expected an int >= 2, got {group_size!r}")
        if group_size < 2:
            raise ValueError(f"group_size: expected an int >= 2 (a group of one row has no baseline), got {group_size}")
        if batch % group_size:
            raise ValueError(f"group_size: B = {batch} rows are not divisible by group_size = {group_size}")
        return contiguous_groups(batch, group_size, device)
    _tensor("group_index", group_index, (batch,), device)
    if group_index.dtype != torch.int64:
        raise TypeError(f"group_index: expected dtype int64, got {group_index.dtype}")
    groups = indexed_groups(group_index)
    checks.add((groups.size < 2).any(), "group_index: every group needs at least 2 rows, found a group of size 1")
    return groups


def check_options(mode, alpha, scale_by_std, std_eps, length_gamma, **surrogate) -> LossConfig:
    """The advantage options (SPEC steps 5-7, 10) into a :class:`LossConfig`; ``surrogate``
    holds the already-checked options of steps 8-9.  ``std_eps`` must be > 0: an all-correct
    group has std 0, and ``0 / (0 + 0)`` would make its advantages NaN."""
    return LossConfig(
        mode=_choice("mode", mode, MODES),
        alpha=_number("alpha", alpha, 0.0),
        scale_by_std=bool(scale_by_std),
        std_eps=_number("std_eps", std_eps, 0.0, open_low=True),
        length_gamma=None if length_gamma is None else _number("length_gamma", length_gamma, 0.0, 1.0, open_low=True),
        **surrogate,
    )


def validate(
    logits, target_ids, completion_mask, rewards, group_size, group_index, old_logprobs,
    ref_logprobs, beta, mode, alpha, eps_low, eps_high, clip_ratio_c, temperature,
    loss_agg_mode, scale_by_std, std_eps, length_gamma, backend,
) -> Checked:
    """Check every argument of ``fused_lens_loss``; raise ``ValueError``/``TypeError`` naming it."""
    check_logits(logits)
    batch, length, _ = logits.shape
    device = logits.device
    checks = ValueChecks()
    check_targets(target_ids, logits, checks)
    check_mask(completion_mask, (batch, length), device, checks)
    check_rewards(rewards, batch, device, checks)
    groups = check_groups(group_size, group_index, batch, device, checks)
    for name, value in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if value is not None:
            _float_tensor(name, value, (batch, length), device)
    beta = _number("beta", beta, 0.0)
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta: a KL penalty (beta > 0) needs ref_logprobs")
    cfg = check_options(
        mode, alpha, scale_by_std, std_eps, length_gamma,
        eps_low=_number("eps_low", eps_low, 0.0, 1.0),
        eps_high=_number("eps_high", eps_high, 0.0),
        clip_ratio_c=None if clip_ratio_c is None else _number("clip_ratio_c", clip_ratio_c, 1.0, open_low=True),
        beta=beta,
        loss_agg_mode=_choice("loss_agg_mode", loss_agg_mode, LOSS_AGG_MODES),
    )
    check_temperature(temperature)
    backend = check_backend(backend, logits)
    checks.settle()
    return Checked(groups, cfg, backend)
