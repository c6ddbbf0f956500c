"""The study's statistics on inputs with known answers: t quantiles from tables, a t-interval
by hand, its coverage on simulated normal data, sign-flip p-values by enumeration by hand,
and verdicts that never call an interval containing 0 a difference."""
from __future__ import annotations

import math
import random

import pytest

from lens_kernels.train import stats
from lens_kernels.train.stats import mean_ci, paired, sign_flip_test, t_cdf_abs, t_quantile, verdict


@pytest.mark.parametrize("df, table", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (7, 2.3646),
                                       (30, 2.0423), (120, 1.9799)],
                         ids=lambda v: f"{v}")
def test_t_quantile_matches_the_table(df, table):
    assert t_quantile(0.95, df) == pytest.approx(table, abs=1e-4)
    assert t_cdf_abs(table, df) == pytest.approx(0.95, abs=1e-5)


def test_mean_ci_by_hand():
    out = mean_ci([1, 2, 3, 4, 5])
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)  # t_{.975,4} * sd / sqrt(n)
    assert out["mean"] == 3 and out["sd"] == pytest.approx(math.sqrt(2.5))
    assert out["low"] == pytest.approx(3 - half, abs=1e-6)
    assert out["high"] == pytest.approx(3 + half, abs=1e-6)
    assert mean_ci([0.4])["low"] is None  # one value: a mean, no interval


def test_t_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = random.Random(12)
    reps = 4000
    covered = 0
    for _ in range(reps):
        out = mean_ci([rng.gauss(1.0, 2.0) for _ in range(5)])
        covered += out["low"] <= 1.0 <= out["high"]
    assert abs(covered / reps - 0.95) < 0.012  # 3.5 standard errors of a binomial share


@pytest.mark.parametrize("diffs, p", [
    ([1, 2, 3, 4, 5], 2 / 32),   # only all-plus and all-minus are as extreme
    ([1, -1], 1.0),              # every pattern is as extreme as the observed 0
    ([3, -1, 2], 4 / 8),         # sums 4, 0, 6, 2, -2, -6, 0, -4: four with |sum| >= 4
    ([0.1, 0.2, 0.3], 2 / 8),    # rounding must not drop the observed pattern itself
], ids=["all-positive-5", "cancelling-pair", "mixed-3", "decimal-ties"])
def test_sign_flip_exact_p_values_by_hand(diffs, p):
    assert sign_flip_test(diffs) == pytest.approx(p)


def test_sign_flip_monte_carlo_above_the_exact_limit(monkeypatch):
    monkeypatch.setattr(stats, "MONTE_CARLO_DRAWS", 2000)
    ones = [1.0] * (stats.EXACT_MAX_N + 4)
    assert sign_flip_test(ones) == pytest.approx(1 / 2001)  # exact p is 2 / 2^20
    alternating = [1.0, -1.0] * ((stats.EXACT_MAX_N + 4) // 2)
    assert sign_flip_test(alternating) == 1.0


def test_paired_differences_and_verdicts():
    better = paired([0.30, 0.32, 0.29, 0.35, 0.31], [0.20, 0.21, 0.22, 0.20, 0.19])
    assert better["diffs"] == pytest.approx([0.10, 0.11, 0.07, 0.15, 0.12])
    assert better["mean"] == pytest.approx(0.11) and better["wins"] == 5
    assert better["low"] > 0 and better["p_sign_flip"] == pytest.approx(2 / 32)
    assert verdict(better["low"], better["high"], "a higher", "a lower") == "a higher"
    tie = paired([0.30, 0.20, 0.25, 0.22], [0.25, 0.24, 0.21, 0.23])
    assert tie["low"] < 0 < tie["high"]
    assert verdict(tie["low"], tie["high"], "a higher", "a lower").startswith("no detectable")
    assert verdict(-0.2, -0.1, "a higher", "a lower") == "a lower"
    assert verdict(None, None, "a higher", "a lower") == "too few seeds for an interval"


@pytest.mark.parametrize("call, name", [
    (lambda: mean_ci([]), "values"),
    (lambda: mean_ci([1.0, float("nan")]), "values"),
    (lambda: paired([1.0], [1.0, 2.0]), "a, b"),
    (lambda: paired([1.0, float("inf")], [1.0, 2.0]), "a:"),
    (lambda: sign_flip_test([]), "diffs"),
    (lambda: t_quantile(1.5, 3), "level"),
    (lambda: t_cdf_abs(1.0, 0), "df"),
], ids=["empty", "nan", "unpaired", "inf", "no-diffs", "level", "df"])
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
