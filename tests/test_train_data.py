"""Data: \\boxed{} extraction, MATH-style JSONL, the toy task, the resumable prompt sampler;
and the unbiased pass@k estimator against brute-force enumeration."""
from __future__ import annotations

import itertools
import json
from math import comb

import pytest

from lens_kernels.train.data import (
    Problem, PromptSampler, last_boxed, load_jsonl, load_problems, toy_problems,
)
from lens_kernels.train.evaluate import pass_at_k, summarize


@pytest.mark.parametrize(
    "text,expected",
    [
        ("\\boxed{5}", "5"),
        ("a \\boxed{1} b \\boxed{\\frac{1}{2}} c", "\\frac{1}{2}"),
        ("\\boxed{\\left\\{1,2\\right\\}}", "\\left\\{1,2\\right\\}"),
        ("\\boxed{x^{2^{3}}}", "x^{2^{3}}"),
        ("\\boxed{1} then \\boxed{2", "1"),  # the last box is unclosed: the earlier one counts
        ("\\boxed{}", ""),
        ("no box here", None),
        ("\\boxed{3", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_load_jsonl_forms(tmp_path):
    rows = [
        {"problem": "1+1?", "answer": "2", "level": 3},
        {"problem": "Half?", "solution": "So it is \\boxed{\\frac{1}{2}}.", "level": "Level 5"},
        {"problem": "No level", "answer": 7},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_jsonl(str(path)) == [
        Problem("1+1?", "2", 3), Problem("Half?", "\\frac{1}{2}", 5), Problem("No level", "7", None),
    ]


@pytest.mark.parametrize(
    "row,match",
    [({"answer": "2"}, "missing 'problem'"), ({"problem": "p", "solution": "no box"}, "answer")],
)
def test_load_jsonl_rejects_bad_rows(tmp_path, row, match):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=match):
        load_jsonl(str(path))


def test_toy_problems_are_correct_balanced_and_seeded():
    problems = toy_problems(500, seed=4)
    assert problems == toy_problems(500, seed=4) != toy_problems(500, seed=5)
    assert sorted({p.level for p in problems}) == [1, 2, 3, 4, 5]
    assert all(sum(p.level == lv for p in problems) == 100 for lv in range(1, 6))
    for p in problems:
        assert p.problem.endswith("=") and str(eval(p.problem[:-1])) == p.answer
    assert load_problems("toy", 10, 4) == toy_problems(10, 4)


def test_prompt_sampler_covers_each_pass_and_resumes_exactly():
    full = PromptSampler(7, seed=1)
    draws = [full.next(3) for _ in range(6)]
    flat = [i for d in draws for i in d]
    assert sorted(flat[:7]) == list(range(7)) and sorted(flat[7:14]) == list(range(7))
    part = PromptSampler(7, seed=1)
    for _ in range(4):
        part.next(3)
    resumed = PromptSampler.from_state(part.state_dict())
    assert [resumed.next(3) for _ in range(2)] == draws[4:]


def _brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    draws = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in d) for d in draws) / len(draws)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 10])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    assert pass_at_k(16, 1, 1) == pytest.approx(1 / 16)
    assert pass_at_k(16, 1, 16) == 1.0
    assert pass_at_k(200, 3, 16) == pytest.approx(1 - comb(197, 16) / comb(200, 16), rel=1e-12)


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_summarize_overall_per_level_and_hard_subset():
    problems = [Problem("a", "1", 1), Problem("b", "1", 4), Problem("c", "1", 5), Problem("d", "1")]
    correct = [4, 0, 2, 1]
    out = summarize(problems, correct, n=4, ks=[1, 2])
    assert out["eval/pass@1"] == pytest.approx((1 + 0 + 0.5 + 0.25) / 4)
    assert out["eval/hard/pass@1"] == pytest.approx(0.25)
    assert out["eval/hard/pass@2"] == pytest.approx((0 + pass_at_k(4, 2, 2)) / 2)
    assert out["eval/level1/pass@2"] == 1.0
    assert (out["eval/problems"], out["eval/hard/problems"], out["eval/level5/problems"]) == (4, 2, 1)
    assert "eval/level4/pass@1" in out and not any("levelNone" in k for k in out)
