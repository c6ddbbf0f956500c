"""Data: \\boxed{} extraction, MATH-style JSONL, the toy task, the resumable prompt sampler;
and the unbiased pass@k estimator against brute-force enumeration."""
from __future__ import annotations

import itertools
import json
import logging
import re
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


GOOD = json.dumps({"problem": "1+1?", "answer": "2"}).encode()


@pytest.mark.parametrize(
    "line,reason",
    [
        (b'{"problem": "p", "answer": "1"', r"bad JSON at column \d+"),
        (b'{"problem": "caf\xe9", "answer": "1"}', "invalid UTF-8 at byte 17 of the line"),
        (b'["p", "1"]', "expected a JSON object, got a list"),
        (b'"p"', "expected a JSON object, got the string 'p'"),
        (b"null", "expected a JSON object, got null"),
        (b'{"answer": "2"}', "'problem': expected a non-empty string, got no 'problem'"),
        (b'{"problem": null, "answer": "2"}', "'problem': expected a non-empty string, got null"),
        (b'{"problem": 12, "answer": "2"}', "'problem': expected a non-empty string, got a number"),
        (b'{"problem": "p", "answer": ["1", "2"]}', "'answer': expected a string or a number, got a list"),
        (b'{"problem": "p", "answer": true}', "'answer': expected a string or a number, got a boolean"),
        (b'{"problem": "p", "answer": NaN}', "'answer': expected a string or a number, got a number"),
        (b'{"problem": "p", "answer": " "}', "'answer': the answer is empty"),
        (b'{"problem": "p", "solution": "so \\\\boxed{}"}', "'solution': the answer is empty"),
        (b'{"problem": "p", "solution": "no box"}', r"no 'answer', and the 'solution' has no \\boxed"),
        (b'{"problem": "p", "solution": 3}', "'solution': expected a string, got a number"),
        (b'{"problem": "p"}', "needs an 'answer' or a 'solution'"),
        (b'{"problem": "p", "answer": "1", "level": [4]}', "'level': expected an integer"),
    ],
    ids=["torn-json", "latin-1", "list-row", "string-row", "null-row", "no-problem", "null-problem",
         "number-problem", "list-answer", "bool-answer", "nan-answer", "blank-answer", "empty-box",
         "no-box", "number-solution", "no-answer", "list-level"],
)
def test_bad_row_is_named_by_file_and_line(tmp_path, line, reason):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD + b"\n\n" + line + b"\n")  # the bad row is line 3, after a blank line
    with pytest.raises(ValueError) as err:
        load_jsonl(str(path))
    message = str(err.value)
    assert "1 of 2 rows are bad" in message, message
    assert re.search(re.escape(f"{path}:3: ") + reason, message), message


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD + b"\n" + GOOD + b"\n")
    assert load_jsonl(str(path)) == [Problem("1+1?", "2")] * 2


def test_a_few_bad_rows_are_skipped_with_a_count(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    lines = [GOOD] * 39 + [b'{"problem": null, "answer": "2"}']  # 1 bad of 40: 2.5%
    path.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING, logger="lens_kernels.train"):
        assert len(load_jsonl(str(path))) == 39
    assert f"{path}: skipped 1 bad of 40 rows (39 problems loaded)" in caplog.text
    assert f"{path}:40: 'problem'" in caplog.text


def test_too_many_bad_rows_refuse_the_file(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [GOOD] * 30 + [b"[]"] * 8  # 8 bad of 38: 21%
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match="8 of 38 rows are bad, more than 5%; refusing") as err:
        load_jsonl(str(path))
    assert f"{path}:31: expected a JSON object" in str(err.value)
    assert f"{path}:36:" not in str(err.value) and "... and 3 more" in str(err.value)
    assert len(load_jsonl(str(path), max_bad_fraction=0.25)) == 30


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n \n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: no problems in 0 rows")):
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
