"""The options of one loss call, in one immutable record carried from the public function to
the launchers (``LensOptions``), and the record of SPEC steps 3-9 (``EpilogueResult``)."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import struct
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

MODES = ("lens", "grpo", "lens-mixed-only", "lens-negative-only")
LOSS_AGG_MODES = (
    "seq-mean-token-mean",
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
# With ``length_gamma`` the negative-sample penalty (SPEC 1.10) is
# ``(1 / n) * pibar / max(gamma - pibar, LENGTH_GAMMA_MIN_GAP * gamma)``: a row at or above
# ``gamma`` is clamped (still finite, still increasing in pibar) rather than raising mid-run.
LENGTH_GAMMA_MIN_GAP = 1e-3


@dataclass(frozen=True)
class LensOptions:
    """Every scalar option of a loss call, checked by ``lens_kernels.validation``.

    The math options are SPEC section 1's; ``backend`` is already resolved (never ``"auto"``);
    ``check_values`` says whether the checks that read tensor values (and sync the host) run.
    Custom ops receive the record as its ``key`` string and rebuild it with
    :meth:`from_key` (cached), so one object travels from the public function to the kernels.
    """

    mode: str = "lens"
    alpha: float = 0.25
    eps_low: float = 0.2
    eps_high: float = 0.2
    clip_ratio_c: Optional[float] = None
    beta: float = 0.0
    temperature: float = 1.0
    loss_agg_mode: str = "seq-mean-token-mean"
    scale_by_std: bool = True
    std_eps: float = 1e-6
    length_gamma: Optional[float] = None
    backend: str = "torch"
    inplace_backward: bool = False
    check_values: bool = True
    key: str = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        values = tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.init)
        object.__setattr__(self, "key", _key(values))

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature

    @property
    def inv_temperature_parts(self) -> tuple[float, float]:
        """``1 / temperature`` as an fp32 high part and an fp32 low part (``split_float``):
        kernels scale with ``x * hi + x * lo`` (an fma where there is one), which is unbiased,
        where ``x * fp32(1 / t)`` carries the one-sided relative error of ``fp32(1 / t)`` into
        every fp32 log-prob.  Gradients take ``hi + lo`` (rounded to fp32), never ``hi`` alone."""
        return split_float(self.inv_temperature)

    @property
    def lens_mixed(self) -> bool:
        """Mixed groups take their advantages from the calibrated reward."""
        return self.mode in ("lens", "lens-mixed-only")

    @property
    def lens_negative(self) -> bool:
        """Negative groups take their (de-meaned, ``alpha``-weighted) advantages from it."""
        return self.mode in ("lens", "lens-negative-only")

    @staticmethod
    def from_key(key: str) -> "LensOptions":
        return _from_key(key)


# Significant bits of the high part of a split scale (see ``split_float``).
SPLIT_HI_BITS = 12


@functools.lru_cache(maxsize=64)
def split_float(value: float) -> tuple[float, float]:
    """``value`` as fp32 ``(hi, lo)`` with ``hi + lo = value`` to ~2**-35 relative.

    ``hi`` keeps ``SPLIT_HI_BITS`` significant bits, rounded toward zero, and ``lo`` (``hi``'s
    sign) lies between 2**-16 and 2**-11 of ``value``, or is 0 when ``value`` has no more bits.
    Then ``x * hi + x * lo`` is unbiased in fp32 with or without an fma: ``x * hi`` rounds
    fairly (exactly for bf16/fp16 ``x``) and ``x * lo`` stands far above the last place of the
    sum, so its rounding is fair too.  (With a full 24-bit ``hi``, ``x * lo`` sits below half
    an ulp: fp32 arithmetic without an fma, e.g. PyTorch or Triton's interpreter, drops it and
    keeps ``hi``'s one-sided error.)  An infinite ``x`` gives that infinity, never
    ``inf - inf``.  ``hi`` alone is NOT ``value`` to fp32 precision: a gradient's factor is
    ``hi + lo`` rounded to fp32 (the nearest fp32 of ``value``)."""
    if value == 0 or not math.isfinite(value):
        return value, 0.0
    unit = math.ldexp(1.0, math.frexp(value)[1] - SPLIT_HI_BITS)  # last place of a 12-bit hi
    hi = math.trunc(value / unit) * unit  # exact: a power-of-two scaling and an integer
    if value != hi and abs(value - hi) < abs(value) * 2**-16:  # lo too small to stay fair
        hi -= math.copysign(unit, value)
    return _to_fp32(hi), _to_fp32(value - hi)


def _to_fp32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


@torch.compiler.assume_constant_result
def _key(values: tuple) -> str:
    """The options as a string (evaluated once and kept as a constant by ``torch.compile``)."""
    return json.dumps(values)


@functools.lru_cache(maxsize=256)
def _from_key(key: str) -> LensOptions:
    return LensOptions(*json.loads(key))


class EpilogueResult(NamedTuple):
    """SPEC steps 3-9 from the reference formulas (all in the work dtype); ``loss`` is
    differentiable in the log-probs."""

    loss: torch.Tensor  # [] the aggregated objective
    advantages: torch.Tensor  # [B]
    calibrated_rewards: Optional[torch.Tensor]  # [B]; None with caller-given advantages
    confidence: Optional[torch.Tensor]  # [B] pibar; None with caller-given advantages
    difficulty: Optional[torch.Tensor]  # [num_groups] D; None with caller-given advantages
    negative_group_fraction: Optional[torch.Tensor]  # []; None with caller-given advantages
    clip_fraction: torch.Tensor  # [] over masked tokens
    kl: Optional[torch.Tensor]  # [] masked token mean of k3, None without ref_logprobs
