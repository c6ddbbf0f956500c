"""Rewards: math-verify on the last \\boxed{} answer, timeouts and errors counted, the registry."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("math_verify")

from lens_kernels.train.rewards import (  # noqa: E402
    VERIFIERS, ExactVerifier, MathVerifier, Verdict, make_verifier, register_verifier,
)
from lens_kernels.train.verify_pool import JudgePool  # noqa: E402

PATHOLOGICAL = "the answer is \\boxed{9^{9^{9^{9^{9}}}}}"  # sympy evaluates a tower: never ends


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(timeout=6.0, workers=1)  # math-verify's own alarm: 3 s
    yield v
    v.close()


EQUIVALENT = [
    ("\\frac{1}{2}", "so \\boxed{0.5}"),
    ("\\frac{1}{2}", "\\boxed{1/2}"),
    ("0.75", "\\boxed{\\dfrac{3}{4}}"),
    ("\\frac{\\sqrt{2}}{2}", "\\boxed{\\sqrt{2}/2}"),
    ("x^2+2x+1", "\\boxed{(x+1)^2}"),
    ("\\{1,2\\}", "\\boxed{\\{2,1\\}}"),
    ("[0,1)", "\\boxed{[0, 1)}"),
    ("10", "\\boxed{10.0}"),
    ("1000", "\\boxed{1,000}"),
    ("5", "\\boxed{x = 5}"),
    ("90^\\circ", "\\boxed{90}"),
    ("\\text{(B)}", "\\boxed{B}"),
    ("\\frac{1}{2}", "first \\boxed{3}, then finally \\boxed{\\frac{1}{2}}"),  # the last box counts
]


@pytest.mark.parametrize("gold,completion", EQUIVALENT, ids=[c for _, c in EQUIVALENT])
def test_equivalent_forms_score_one(verifier, gold, completion):
    assert verifier.score([completion], [gold]) == [Verdict(1.0, "correct", "")]


WRONG = [
    ("\\frac{1}{2}", "\\boxed{0.51}"),
    ("3", "\\boxed{3.0001}"),
    ("(1,2)", "\\boxed{(2,1)}"),  # ordered pair: order matters
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{2}} no wait \\boxed{2}"),
    ("5", "\\boxed{((}"),  # malformed inside the box: parsed as text, wrong
    ("5", "\\boxed{\\sqrt}"),
]


@pytest.mark.parametrize("gold,completion", WRONG, ids=[c for _, c in WRONG])
def test_wrong_answers_score_zero(verifier, gold, completion):
    (verdict,) = verifier.score([completion], [gold])
    assert (verdict.reward, verdict.status) == (0.0, "wrong")


NO_ANSWER = ["", "   ", "the answer is 5", "\\boxed{}", "\\boxed{   }", "\\boxed{5", "\\boxed 5"]


@pytest.mark.parametrize("completion", NO_ANSWER, ids=repr)
def test_empty_and_unboxed_outputs_are_no_answer(verifier, completion):
    assert verifier.score([completion], ["5"]) == [Verdict(0.0, "no_answer", "")]


def test_unparsable_gold_is_an_error_not_a_wrong_answer(verifier):
    (verdict,) = verifier.score(["\\boxed{5}"], [""])
    assert verdict.status == "error" and verdict.reward == 0.0


def test_pathological_answer_times_out_and_the_verifier_goes_on(verifier, caplog):
    completions = ["\\boxed{2}", PATHOLOGICAL, "\\boxed{4}"]
    with caplog.at_level("WARNING", logger="lens_kernels.train"):
        verdicts = verifier.score(completions, ["2", "1", "4"])
    assert [v.status for v in verdicts] == ["correct", "timeout", "correct"]
    assert verdicts[1].reward == 0.0
    assert "timeout" in caplog.text
    # a timeout is not cached as an answer: the same input is tried (and times out) again
    assert verifier.score([PATHOLOGICAL], ["1"])[0].status == "timeout"


def test_hard_deadline_kills_a_worker_that_math_verify_cannot_stop():
    v = MathVerifier(timeout=2.0, workers=1, inner_timeout=0)  # no SIGALRM inside the worker
    try:
        verdicts = v.score([PATHOLOGICAL, "\\boxed{7}"], ["1", "7"])
        assert [v_.status for v_ in verdicts] == ["timeout", "correct"]
        assert "killed" in verdicts[0].detail
        assert v.pool.restarts == 1
    finally:
        v.close()


def crash_judge(gold: str, answer: str):
    if answer == "crash":
        os._exit(3)
    return ("correct", "") if gold == answer else ("wrong", "")


def raising_judge(gold: str, answer: str):
    raise RuntimeError("judge bug")


def test_pool_reports_a_dead_worker_as_error_and_recovers():
    with JudgePool(crash_judge, timeout=20.0, workers=2) as pool:
        out = pool.run([("a", "a"), ("b", "crash"), ("c", "d"), ("e", "e")])
        assert [r[0] for r in out] == ["correct", "error", "wrong", "correct"]
        assert pool.restarts == 1


def test_pool_reports_a_raising_judge_as_error():
    with JudgePool(raising_judge, timeout=20.0) as pool:
        assert pool.run([("a", "b")]) == [("error", "RuntimeError: judge bug")]


def test_pool_rejects_a_non_positive_timeout():
    with pytest.raises(ValueError, match="timeout"):
        JudgePool(crash_judge, timeout=0)


def test_exact_verifier():
    v = ExactVerifier()
    out = v.score(["\\boxed{ 12 }", "\\boxed{12.0}", "12"], ["12", "12", "12"])
    assert [x.status for x in out] == ["correct", "wrong", "no_answer"]


def test_registry_plugs_in_a_verifier_by_name():
    class Always:
        def score(self, completions, answers):
            return [Verdict(1.0, "correct") for _ in completions]

        def close(self):
            pass

    register_verifier("test-always")(lambda config: Always())
    try:
        v = make_verifier("test-always", None)
        assert v.score(["x"], ["y"]) == [Verdict(1.0, "correct")]
    finally:
        del VERIFIERS["test-always"]
    with pytest.raises(ValueError, match="math-verify"):
        make_verifier("test-always", None)
