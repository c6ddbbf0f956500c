"""Argument checks of SPEC section 3, run once at the public boundary.

Shape, dtype, device and option checks always run, before any kernel.  Checks that read
tensor values (id range, reward range, mask values, finiteness, group sizes) are gathered in a
:class:`ValueChecks` and settled with one host sync; ``check_values=False`` turns them off
(no sync: the call can be captured in a CUDA graph), and they are skipped while
``torch.compile`` traces.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch

from . import backends
from .config import LOSS_AGG_MODES, MODES, LensOptions
from .groups import GroupLayout, contiguous_groups, indexed_groups

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# float64 logits are an extension for debugging and gradcheck: torch backend only.
REFERENCE_DTYPES = LOGITS_DTYPES + (torch.float64,)


class LossInputs(NamedTuple):
    """The tensors of one loss call after validation (unchanged, never copied)."""

    logits: torch.Tensor  # [B, T, V]
    target_ids: torch.Tensor  # [B, T] int64
    mask: torch.Tensor  # [B, T] bool or 0/1 numbers
    rewards: torch.Tensor  # [B]
    groups: Optional[GroupLayout]  # None with caller-given advantages
    old: Optional[torch.Tensor]  # [B, T]
    ref: Optional[torch.Tensor]  # [B, T]
    advantages: Optional[torch.Tensor]  # [B]


def _eager() -> bool:
    return not torch.compiler.is_compiling()


class ValueChecks:
    """Checks that read tensor values, gathered so that one host sync settles them all.

    ``add(bad, message)`` records a 0-dim bool tensor (True = invalid) and the error text (or
    a callable making it, run only on failure); ``settle()`` raises ``ValueError`` for the
    first invalid one.  Nothing is recorded when disabled or while ``torch.compile`` traces.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and _eager()
        self._items: list = []

    def add(self, bad: torch.Tensor, message) -> None:
        if self.enabled:
            self._items.append((bad, message))

    def finite(self, name: str, values: torch.Tensor, live: Optional[torch.Tensor], hint: str = "") -> None:
        """``values`` finite wherever ``live`` (all positions when None)."""
        if not self.enabled:
            return
        bad = ~torch.isfinite(values)
        if live is not None:
            bad &= live.bool()

        def message() -> str:
            first = [int(i) for i in bad.nonzero()[0]]
            where = "masked " if live is not None else ""
            return (f"{name}: expected finite values, found {int(bad.sum())} non-finite {where}position(s), "
                    f"first at {first}{hint}")

        self.add(bad.any(), message)

    def settle(self) -> None:
        if not self._items:
            return
        flags = torch.stack([bad for bad, _ in self._items]).tolist()
        items, self._items = self._items, []
        for flag, (_, message) in zip(flags, items):
            if flag:
                raise ValueError(message() if callable(message) else message)


def _first(values: torch.Tensor, bad: torch.Tensor) -> str:
    """``found <value> at [i, j]``: the first position where ``bad`` is set, in row-major order."""
    index = [int(i) for i in bad.nonzero()[0]]
    value = values[tuple(index)].item()
    return f"found {value:.6g} at {index}" if isinstance(value, float) else f"found {value!r} at {index}"


def _tensor(name: str, value, shape: tuple, device: torch.device, whose: str = "the logits'") -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {list(shape)}, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} ({whose} device), got {value.device}")
    return value


def _float_tensor(name: str, value, shape: tuple, device: torch.device, whose: str = "the logits'") -> torch.Tensor:
    _tensor(name, value, shape, device, whose)
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {value.dtype}")
    return value


def check_devices(whose: str, **tensors) -> None:
    """Every tensor argument on one device, checked before anything else reads a device (the
    backend choice included), so that a mismatch names the tensor on the wrong one.  The
    first argument (logits, hidden, old_logprobs, logp_sum; ``whose`` names its device) sets
    the device, except on ``meta`` beside tensors on a real device: then it is the one named.
    Arguments that are not tensors are skipped (their own checks name them)."""
    present = [(name, value.device) for name, value in tensors.items() if isinstance(value, torch.Tensor)]
    if not present:
        return
    expected, label = present[0][1], f"{whose} device"
    real = [device for _, device in present[1:] if device.type != "meta"]
    if expected.type == "meta" and real:
        expected, label = real[0], "the other tensors' device"
    for name, device in present:
        if device != expected:
            raise ValueError(f"{name}: expected a tensor on {expected} ({label}), got {device}")


def _number(name: str, value, low: float, high: float = math.inf, *, open_low=False, open_high=True) -> float:
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    value = float(value)
    below = value <= low if open_low else value < low
    above = value >= high if open_high else value > high
    if below or above:
        left, right = "(" if open_low else "[", ")" if open_high else "]"
        raise ValueError(f"{name}: expected a value in {left}{low}, {high}{right}, got {value!r}")
    return value


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value


def _choice(name: str, value, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def check_logits(logits, packed: bool = False) -> torch.Tensor:
    """``logits``: a ``[B, T, V]`` fp32/bf16/fp16 tensor with ``V >= 1`` (or packed ``[N, V]``
    where the function takes packed tokens)."""
    shapes = "[B, T, V] or packed [N, V]" if packed else "[B, T, V]"
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor {shapes}, got {type(logits).__name__}")
    if logits.dim() not in ((2, 3) if packed else (3,)) or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected shape {shapes} with V >= 1, got {list(logits.shape)}")
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
    if not _flag("inplace_backward", inplace_backward):
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


def check_shift(target_ids, logits: torch.Tensor) -> None:
    """``[B, T']`` targets for ``[B, T, V]`` logits with ``T' != T``: name the forgotten shift
    (checked first, so that the other ``[B, T]`` arguments are not blamed for it)."""
    if logits.dim() != 3:
        return
    batch, length, _ = logits.shape
    if isinstance(target_ids, torch.Tensor) and target_ids.dim() == 2 and target_ids.shape[0] == batch \
            and target_ids.shape[1] != length:
        raise ValueError(
            f"target_ids: logits and targets disagree in T ({length} vs {target_ids.shape[1]}); "
            "logits[b, t] must predict target_ids[b, t] (e.g. logits[:, :-1] for targets input_ids[:, 1:])"
        )


def check_targets(target_ids, logits: torch.Tensor, mask: Optional[torch.Tensor], checks: ValueChecks) -> torch.Tensor:
    """``target_ids``: int64 ``[B, T]`` (``[N]`` for packed ``[N, V]`` logits) with
    ``0 <= id < V`` wherever ``mask`` is set (any value, e.g. the transformers label -100, at
    masked-out positions)."""
    vocab = logits.shape[-1]
    check_shift(target_ids, logits)
    if logits.dim() == 2 and isinstance(target_ids, torch.Tensor) and target_ids.shape != logits.shape[:1]:
        raise ValueError(f"target_ids: expected shape [N] = {[logits.shape[0]]} for packed logits [N, V] "
                         f"(or [B, T] with logits [B, T, V]), got {list(target_ids.shape)}")
    _tensor("target_ids", target_ids, tuple(logits.shape[:-1]), logits.device)
    if target_ids.dtype != torch.int64:
        raise TypeError(f"target_ids: expected dtype int64, got {target_ids.dtype}")
    if checks.enabled:
        outside = (target_ids < 0) | (target_ids >= vocab)
        if mask is not None:
            outside &= mask.bool()
        where = " at a masked position" if mask is not None else ""
        checks.add(
            outside.any(),
            lambda: f"target_ids: expected ids in [0, {vocab}) (V = logits.shape[-1]){where}, "
                    f"found {target_ids[outside][0].item()} at {[int(i) for i in outside.nonzero()[0]]}",
        )
    return target_ids


def check_mask(completion_mask, shape: tuple, device: torch.device, checks: ValueChecks, whose: str = "the logits'"):
    """``completion_mask``: ``[B, T]`` bool, or numbers that are all 0 or 1."""
    _tensor("completion_mask", completion_mask, shape, device, whose)
    if completion_mask.dtype != torch.bool:
        if completion_mask.is_complex():
            raise TypeError(f"completion_mask: expected bool or 0/1 numbers, got {completion_mask.dtype}")
    if completion_mask.dtype != torch.bool and checks.enabled:
        bad = (completion_mask != 0) & (completion_mask != 1)
        checks.add(bad.any(), lambda: "completion_mask: expected bool or values in {0, 1}, " + _first(completion_mask, bad))
    return completion_mask


def check_rewards(rewards, batch: int, device: torch.device, checks: ValueChecks, whose: str = "the logits'"):
    """``rewards``: float ``[B]`` in ``[0, 1]``, no NaN."""
    _float_tensor("rewards", rewards, (batch,), device, whose)
    if checks.enabled:
        bad = ~((rewards >= 0) & (rewards <= 1))
        checks.add(bad.any(), lambda: "rewards: expected values in [0, 1] (binary or fractional), " + _first(rewards, bad))
    return rewards


# Log-probs are <= 0; fp32 rounding can leave a confident token's slightly above 0, never by this much.
LOGPROB_ROUNDING = 1e-4


def check_logprob_values(name: str, values: torch.Tensor, mask: torch.Tensor, checks: ValueChecks) -> None:
    """``old_logprobs`` / ``ref_logprobs``: finite and at most ``LOGPROB_ROUNDING`` wherever
    ``mask`` is set; a positive value names its position and what was likely passed instead."""
    if not checks.enabled:
        return
    checks.finite(name, values, mask)
    live = mask.bool()
    bad = (values > LOGPROB_ROUNDING) & live

    def message() -> str:
        given = values[live]
        if bool(((given >= 0) & (given <= 1)).all()):
            likely = "probabilities? pass their log"
        elif bool((given >= 0).all()):
            likely = "negated log-probs (a loss or NLL)? pass them with the sign flipped"
        else:
            likely = "some tokens' values are not log-probs (probabilities, or the wrong sign?)"
        return (f"{name}: expected log-probabilities (<= 0) at masked positions, "
                f"{_first(values, bad)} ({int(bad.sum())} above {LOGPROB_ROUNDING:g}); {likely}")

    checks.add(bad.any(), message)


def check_groups(group_size, group_index, batch: int, device: torch.device, checks: ValueChecks,
                 optional: bool = False) -> Optional[GroupLayout]:
    """Exactly one of ``group_size`` (``G >= 2`` dividing ``B``) and ``group_index`` (int64
    ``[B]``, every group at least 2 rows); neither is also accepted when ``optional``."""
    if group_size is None and group_index is None and optional:
        return None
    if (group_size is None) == (group_index is None):
        raise ValueError("group_size / group_index: pass exactly one of the two")
    if group_index is None:
        if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
            raise ValueError(f"group_size: expected an int >= 2, got {group_size!r}")
        group_size = int(group_size)
        if group_size < 2:
            raise ValueError(f"group_size: expected an int >= 2 (a group of one row has no baseline), got {group_size}")
        if batch % group_size:
            raise ValueError(f"group_size: B = {batch} rows are not divisible by group_size = {group_size}")
        return contiguous_groups(batch, group_size)
    _tensor("group_index", group_index, (batch,), device)
    if group_index.dtype != torch.int64:
        raise TypeError(f"group_index: expected dtype int64, got {group_index.dtype}")
    groups = indexed_groups(group_index)
    if checks.enabled:
        checks.add((groups.size < 2).any(), "group_index: every group needs at least 2 rows, found a group of size 1")
    return groups


def advantage_options(mode, alpha, scale_by_std, std_eps, length_gamma) -> dict:
    """The options of SPEC steps 5-7 and 10.  ``std_eps`` must be > 0: an all-correct group
    has std 0, and ``0 / (0 + 0)`` would make its advantages NaN."""
    return dict(
        mode=_choice("mode", mode, MODES),
        alpha=_number("alpha", alpha, 0.0),
        scale_by_std=_flag("scale_by_std", scale_by_std),
        std_eps=_number("std_eps", std_eps, 0.0, open_low=True),
        length_gamma=None if length_gamma is None else _number("length_gamma", length_gamma, 0.0, 1.0, open_low=True),
    )


def check_temperature(temperature) -> float:
    temperature = _number("temperature", temperature, 0.0, open_low=True)
    inverse = 1.0 / temperature
    if not math.isfinite(inverse) or inverse > 1e30 or inverse < torch.finfo(torch.float32).tiny:
        raise ValueError(
            f"temperature: expected a value whose inverse is a finite, normal fp32 number "
            f"(about 1e-30 <= temperature <= 1e38), got {temperature!r}"
        )
    return temperature


_OPTIONS: dict = {}  # loss_options results by call (see there)
_OPTIONS_MAX = 1024


def loss_options(logits: torch.Tensor, has_ref: bool, values: dict) -> LensOptions:
    """``values`` (the scalar keyword arguments of ``fused_lens_loss``) into :class:`LensOptions`.

    Validated once per distinct call: the result is kept by the values (with their types, so
    ``True`` never stands for ``1.0``), the logits' device and dtype, whether ``ref_logprobs``
    came, and with ``inplace_backward=True`` the logits' shape and strides; only valid
    options are kept, and backend availability is read on the first call of a key."""
    if torch.compiler.is_compiling():
        return _loss_options(logits, has_ref, values)
    key = (logits.device, logits.dtype, has_ref, tuple((type(v), v) for v in values.values()),
           (logits.shape, logits.stride()) if values["inplace_backward"] is True else None)
    try:
        options = _OPTIONS.get(key)
    except TypeError:  # an unhashable value: validation names it
        return _loss_options(logits, has_ref, values)
    if options is None:
        options = _loss_options(logits, has_ref, values)
        if len(_OPTIONS) < _OPTIONS_MAX:
            _OPTIONS[key] = options
    return options


def _loss_options(logits: torch.Tensor, has_ref: bool, values: dict) -> LensOptions:
    beta = _number("beta", values["beta"], 0.0)
    if beta > 0 and not has_ref:
        raise ValueError("beta: a KL penalty (beta > 0) needs ref_logprobs")
    clip_ratio_c = values["clip_ratio_c"]
    return LensOptions(
        **advantage_options(values["mode"], values["alpha"], values["scale_by_std"], values["std_eps"],
                            values["length_gamma"]),
        eps_low=_number("eps_low", values["eps_low"], 0.0, 1.0),
        eps_high=_number("eps_high", values["eps_high"], 0.0),
        clip_ratio_c=None if clip_ratio_c is None else _number("clip_ratio_c", clip_ratio_c, 1.0, open_low=True),
        beta=beta,
        temperature=check_temperature(values["temperature"]),
        loss_agg_mode=_choice("loss_agg_mode", values["loss_agg_mode"], LOSS_AGG_MODES),
        backend=check_backend(values["backend"], logits),
        inplace_backward=check_inplace(values["inplace_backward"], logits),
        check_values=_flag("check_values", values["check_values"]),
    )


def validate_loss(
    logits, target_ids, completion_mask, rewards, group_size, group_index, old_logprobs, ref_logprobs,
    advantages, values: dict, whose: str = "the logits'",
) -> tuple[LossInputs, LensOptions, ValueChecks]:
    """Check every argument of ``fused_lens_loss``; raise ``ValueError``/``TypeError`` naming it.
    ``whose`` names the logits' device in messages (``"hidden's"`` for a stand-in).

    Returns the inputs, the options and the pending value checks (the caller settles them,
    with the finiteness of the log-probs, in one host sync)."""
    check_logits(logits)
    check_shift(target_ids, logits)
    check_devices(whose, logits=logits, target_ids=target_ids, completion_mask=completion_mask,
                  rewards=rewards, group_index=group_index, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                  advantages=advantages)
    batch, length, _ = logits.shape
    device = logits.device
    for name, value in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if value is not None:
            _float_tensor(name, value, (batch, length), device)
    options = loss_options(logits, ref_logprobs is not None, values)
    checks = ValueChecks(options.check_values)
    check_mask(completion_mask, (batch, length), device, checks)
    check_targets(target_ids, logits, completion_mask, checks)
    check_rewards(rewards, batch, device, checks)
    groups = check_groups(group_size, group_index, batch, device, checks, optional=advantages is not None)
    if advantages is not None:
        _float_tensor("advantages", advantages, (batch,), device)
        checks.finite("advantages", advantages, None)
    for name, value in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if value is not None:
            check_logprob_values(name, value, completion_mask, checks)
    inputs = LossInputs(logits, target_ids, completion_mask, rewards, groups, old_logprobs, ref_logprobs, advantages)
    return inputs, options, checks
