"""Small-sample statistics for multi-seed comparisons (no SciPy needed).

- ``mean_ci``: the mean and its Student-t confidence interval (the t quantile is exact for the
  integer degrees of freedom used here, from the closed-form t distribution function);
- ``sign_flip_test``: the paired sign-flip permutation test of "mean difference = 0", exact
  (all 2^n sign patterns) up to ``EXACT_MAX_N`` pairs, Monte Carlo with a fixed seed above;
- ``paired``: per-seed differences ``a - b`` with their interval, the test and a verdict that
  never calls a difference whose interval contains 0 a win.

With n pairs the smallest two-sided sign-flip p-value is ``2 / 2^n``: 0.0625 for n = 5, so
five seeds can never reach p < 0.05 with this test, however large the effect.
"""
from __future__ import annotations

import itertools
import math
import random
from typing import Optional, Sequence

EXACT_MAX_N = 16
MONTE_CARLO_DRAWS = 100_000


def t_cdf_abs(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df: expected a positive integer, got {df}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 0:  # sin(theta) * (1 + c^2/2 + 1*3 c^4/(2*4) + ...), df/2 terms
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c * c * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    if df == 1:
        return 2 * theta / math.pi
    term, total = c, c  # (2/pi)(theta + sin(theta)(c + 2/3 c^3 + 2*4/(3*5) c^5 + ...))
    for k in range(1, (df - 1) // 2):
        term *= c * c * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + s * total)


def t_quantile(level: float, df: int) -> float:
    """The t such that P(|T| <= t) = ``level`` (e.g. 0.95 -> 2.776 for df = 4)."""
    if not 0 < level < 1:
        raise ValueError(f"level: expected a number in (0, 1), got {level}")
    lo, hi = 0.0, 1.0
    while t_cdf_abs(hi, df) < level:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf_abs(mid, df) < level:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _finite(values: Sequence[float], name: str) -> list[float]:
    out = [float(v) for v in values]
    if any(not math.isfinite(v) for v in out):
        raise ValueError(f"{name}: expected finite numbers, got {values}")
    return out


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict:
    """``{"mean", "low", "high", "sd", "n"}``; the interval is None for fewer than 2 values."""
    xs = _finite(values, "values")
    n = len(xs)
    if n == 0:
        raise ValueError("values: expected at least one value")
    mean = sum(xs) / n
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "sd": None, "n": n}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(level, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "sd": sd, "n": n}


def sign_flip_test(diffs: Sequence[float], seed: int = 0) -> float:
    """Two-sided p-value of the paired sign-flip test: the share of sign patterns whose mean
    is at least as far from 0 as the observed one (the observed pattern included)."""
    ds = _finite(diffs, "diffs")
    n = len(ds)
    if n == 0:
        raise ValueError("diffs: expected at least one difference")
    observed = abs(sum(ds)) * (1 - 1e-12)  # ties count as extreme despite rounding
    if n <= EXACT_MAX_N:
        hits = sum(abs(sum(s * d for s, d in zip(signs, ds))) >= observed
                   for signs in itertools.product((1, -1), repeat=n))
        return hits / 2 ** n
    rng = random.Random(seed)
    hits = sum(abs(sum(d if rng.random() < 0.5 else -d for d in ds)) >= observed
               for _ in range(MONTE_CARLO_DRAWS))
    return (hits + 1) / (MONTE_CARLO_DRAWS + 1)


def verdict(low: Optional[float], high: Optional[float], higher: str, lower: str) -> str:
    """``higher`` when the whole interval is above 0, ``lower`` when below, else no claim."""
    if low is None or high is None:
        return "too few seeds for an interval"
    if low > 0:
        return higher
    if high < 0:
        return lower
    return "no detectable difference (the interval contains 0)"


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """Per-pair differences ``a - b``: their mean and interval, the sign-flip p-value and how
    many pairs favour ``a``."""
    if len(a) != len(b):
        raise ValueError(f"a, b: expected the same number of paired values, got {len(a)} "
                         f"and {len(b)}")
    diffs = [x - y for x, y in zip(_finite(a, "a"), _finite(b, "b"))]
    out = mean_ci(diffs, level)
    out["p_sign_flip"] = sign_flip_test(diffs)
    out["wins"] = sum(d > 0 for d in diffs)
    out["diffs"] = diffs
    return out
