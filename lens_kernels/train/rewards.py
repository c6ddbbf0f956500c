"""Verifiable rewards: the final ``\\boxed{}`` answer against the gold answer, 1 or 0.

``VERIFIERS`` maps a name to a factory ``factory(config) -> Verifier``; add one with
``@register_verifier("name")`` in a module named by ``--plugins`` and select it with
``--verifier name``.  A verifier returns one ``Verdict(reward, status, detail)`` per completion;
``status`` is one of ``STATUSES``: timeouts and errors score 0 but are counted and logged by the
trainer, never folded silently into "wrong".
"""
from __future__ import annotations

import importlib
import logging
from typing import Callable, NamedTuple, Protocol, Sequence

from .data import last_boxed
from .verify_pool import JudgePool

log = logging.getLogger("lens_kernels.train")

STATUSES = ("correct", "wrong", "no_answer", "timeout", "error")


class Verdict(NamedTuple):
    reward: float
    status: str
    detail: str = ""


class Verifier(Protocol):
    def score(self, completions: Sequence[str], answers: Sequence[str]) -> list[Verdict]: ...

    def close(self) -> None: ...


VERIFIERS: dict[str, Callable[..., Verifier]] = {}


def register_verifier(name: str):
    def decorate(factory: Callable[..., Verifier]) -> Callable[..., Verifier]:
        VERIFIERS[name] = factory
        return factory

    return decorate


def make_verifier(name: str, config) -> Verifier:
    if name not in VERIFIERS:
        raise ValueError(f"verifier: unknown {name!r}; registered: {sorted(VERIFIERS)}")
    return VERIFIERS[name](config)


def math_verify_judge(gold: str, answer: str, inner_timeout: int) -> tuple[str, str]:
    """math-verify on ``\\boxed{gold}`` vs ``\\boxed{answer}``; runs in a worker's main thread."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    mv_timeout = inner_timeout if inner_timeout > 0 else None
    try:
        gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=mv_timeout, raise_on_error=True)
        if not gold_parsed:
            return "error", f"gold answer {gold!r} does not parse"
        parsed = parse("\\boxed{" + answer + "}", parsing_timeout=mv_timeout, raise_on_error=True)
        if not parsed:
            return "wrong", "answer does not parse"
        ok = verify(gold_parsed, parsed, timeout_seconds=mv_timeout, raise_on_error=True)
        return ("correct", "") if ok else ("wrong", "")
    except TimeoutException:
        return "timeout", f"math-verify timed out after {inner_timeout} s"


class _Judge:
    """Picklable ``(gold, answer) -> (status, detail)`` for the worker processes."""

    def __init__(self, inner_timeout: int):
        self.inner_timeout = inner_timeout

    def prepare(self) -> None:
        """Load math-verify (sympy, the LaTeX parser) before the first deadline starts."""
        importlib.import_module("math_verify")

    def __call__(self, gold: str, answer: str) -> tuple[str, str]:
        return math_verify_judge(gold, answer, self.inner_timeout)


def _answered(box) -> bool:
    return box is not None and bool(box.strip())


class MathVerifier:
    """math-verify in ``workers`` child processes, ``timeout`` seconds per answer.

    math-verify's own alarm (``inner_timeout`` seconds, default half the deadline; 0 turns it
    off) stops slow symbolic work cheaply; the parent's deadline kills whatever it cannot stop.
    Decided (correct/wrong) pairs are cached, so repeated answers cost nothing.
    """

    def __init__(self, timeout: float = 10.0, workers: int = 1, inner_timeout: int | None = None):
        inner = max(1, int(timeout // 2)) if inner_timeout is None else inner_timeout
        self.pool = JudgePool(_Judge(inner), timeout, workers)
        self._cache: dict[tuple[str, str], tuple[str, str]] = {}

    def score(self, completions: Sequence[str], answers: Sequence[str]) -> list[Verdict]:
        keys = [(gold, last_boxed(text)) for text, gold in zip(completions, answers)]
        todo = sorted({k for k in keys if _answered(k[1]) and k not in self._cache})
        fresh = dict(zip(todo, self.pool.run(todo)))
        for key, (status, detail) in fresh.items():
            if status in ("correct", "wrong"):
                self._cache[key] = (status, detail)
            else:
                log.warning("verifier %s on answer %.80r (gold %.40r): %s",
                            status, key[1], key[0], detail)
        verdicts = []
        for key in keys:
            if not _answered(key[1]):
                verdicts.append(Verdict(0.0, "no_answer"))
                continue
            status, detail = self._cache.get(key) or fresh[key]
            verdicts.append(Verdict(1.0 if status == "correct" else 0.0, status, detail))
        return verdicts

    def close(self) -> None:
        self.pool.close()


class ExactVerifier:
    """String equality of the last ``\\boxed{}`` content and the gold answer (whitespace
    removed); no dependencies, no processes.  A minimal example of a plug-in verifier."""

    def score(self, completions: Sequence[str], answers: Sequence[str]) -> list[Verdict]:
        out = []
        for text, gold in zip(completions, answers):
            box = last_boxed(text)
            if not _answered(box):
                out.append(Verdict(0.0, "no_answer"))
            else:
                same = "".join(box.split()) == "".join(gold.split())
                out.append(Verdict(float(same), "correct" if same else "wrong"))
        return out

    def close(self) -> None:
        pass


@register_verifier("math-verify")
def _math_verify_factory(config) -> Verifier:
    return MathVerifier(config.verify_timeout, config.verify_workers)


@register_verifier("exact")
def _exact_factory(config) -> Verifier:
    return ExactVerifier()
