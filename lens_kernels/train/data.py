"""Problems: MATH-style JSONL files, the built-in toy arithmetic task, and a resumable sampler.

A problem is ``Problem(problem, answer, level)``.  JSONL rows need ``problem`` and either
``answer`` or a ``solution`` whose last ``\\boxed{...}`` is the answer; ``level`` is optional
(an int 1-5 or MATH's ``"Level 4"``).  Bad rows are named by file and line, skipped with a
warning, or the file is refused when there are too many (``load_jsonl``).
"""
from __future__ import annotations

import codecs
import json
import logging
import math
import random
import re
from typing import NamedTuple, Optional

import torch

BOXED = "\\boxed"
log = logging.getLogger("lens_kernels.train")


class Problem(NamedTuple):
    problem: str
    answer: str
    level: Optional[int] = None


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (braces balanced), or None when there is none."""
    start = text.rfind(BOXED + "{")
    while start >= 0:
        opening, depth = start + len(BOXED), 0
        for i in range(opening, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[opening + 1 : i]
        start = text.rfind(BOXED + "{", 0, start)  # unclosed: fall back to an earlier one
    return None


MAX_BAD_FRACTION = 0.05  # a file with more bad rows than this is refused, not skipped through
_SHOWN = 5  # bad rows quoted in a warning or an error


def _kind(value) -> str:
    """How a JSON value reads in a message: ``a list``, ``null``, ``the string 'x'``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return f"the string {value!r}" if len(value) <= 40 else "a string"
    return {dict: "an object", list: "a list"}.get(type(value), "a number")


def _answer(value, field: str) -> str:
    """The gold answer as text: a non-empty string, or a finite number written as text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{field!r}: expected a string or a number, got {_kind(value)}")
    if not value.strip():
        raise ValueError(f"{field!r}: the answer is empty")
    return value.strip()


def _level(value) -> Optional[int]:
    """An int, MATH's ``"Level 4"`` (no digits, as in ``"Level ?"``: unknown), or null."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ValueError(f"'level': expected an integer or a string like 'Level 4', got {_kind(value)}")
    match = re.search(r"\d+", value)
    return int(match.group()) if match else None


def parse_row(line: str) -> Problem:
    """One JSONL row as a Problem; ``ValueError`` saying what is wrong with it."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"bad JSON at column {err.colno}: {err.msg}") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {_kind(row)}")
    problem = row.get("problem")
    if not isinstance(problem, str) or not problem.strip():
        got = "no 'problem'" if "problem" not in row else _kind(problem)
        raise ValueError(f"'problem': expected a non-empty string, got {got}")
    if row.get("answer") is not None:
        answer = _answer(row["answer"], "answer")
    elif isinstance(row.get("solution"), str):
        boxed = last_boxed(row["solution"])
        if boxed is None:
            raise ValueError("no 'answer', and the 'solution' has no \\boxed{...}")
        answer = _answer(boxed, "solution")
    elif "solution" in row:
        raise ValueError(f"'solution': expected a string, got {_kind(row['solution'])}")
    else:
        raise ValueError("needs an 'answer' or a 'solution' with \\boxed{...}")
    return Problem(problem, answer, _level(row.get("level")))


def _rows(count: int) -> str:
    return f"{count} row" + "s" * (count != 1)


def _lines(path: str):
    """(1-based line number, text or the UnicodeDecodeError) of each line; a UTF-8 BOM at the
    start of the file is skipped.  Lines end at ``\\n`` only, as ``grep -n`` counts them."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield lineno, err


def load_jsonl(path: str, max_bad_fraction: float = MAX_BAD_FRACTION) -> list[Problem]:
    """The problems of a JSONL file, one JSON object per line; blank lines are ignored.

    A bad row (bad JSON or UTF-8, not an object, a ``problem`` that is not a non-empty string,
    an ``answer`` that is not a non-empty string or a number, no answer at all, a bad ``level``)
    is skipped with a warning that counts them and quotes the first few as ``path:line:
    reason``; when more than ``max_bad_fraction`` of the rows are bad, or none is good, the file
    is refused with a ``ValueError`` that quotes them the same way.
    """
    problems, bad, rows = [], [], 0
    for lineno, line in _lines(path):
        if isinstance(line, UnicodeDecodeError):
            rows += 1
            bad.append(f"{path}:{lineno}: invalid UTF-8 at byte {line.start + 1} of the line")
            continue
        if not line.strip():
            continue
        rows += 1
        try:
            problems.append(parse_row(line))
        except ValueError as err:
            bad.append(f"{path}:{lineno}: {err}")
    quoted = "".join(f"\n  {b}" for b in bad[:_SHOWN]) + (
        f"\n  ... and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else "")
    if not problems:
        raise ValueError(f"{path}: no problems in {_rows(rows)}" + (f"; bad rows:{quoted}" if bad else ""))
    if len(bad) > max_bad_fraction * rows:
        raise ValueError(
            f"{path}: {len(bad)} of {_rows(rows)} are bad, more than {max_bad_fraction:.0%}; "
            f"refusing the file (fix or remove these rows):{quoted}"
        )
    if bad:
        log.warning("%s: skipped %d bad of %s (%d problems loaded):%s", path, len(bad),
                    _rows(rows), len(problems), quoted)
    return problems


# The toy task: one operation per problem, from a finite table of facts per level (so a tiny
# model can learn it by heart); harder levels have longer answers and are rarer to get right
# after the warm start.  The hard subset is levels 4-5, as for MATH.
def _toy_operands(level: int, rng: random.Random) -> tuple[int, str, int]:
    if level == 1:
        return rng.randint(0, 9), "+", rng.randint(0, 9)
    if level == 2:
        return rng.randint(10, 19), "-", rng.randint(0, 9)
    if level == 3:
        return rng.randint(2, 9), "*", rng.randint(2, 9)
    if level == 4:
        return rng.randint(10, 29), "+", rng.randint(10, 29)
    return rng.randint(2, 9), "*", rng.randint(10, 19)


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def toy_problems(count: int, seed: int) -> list[Problem]:
    """``count`` arithmetic problems like ``"14-6="`` with levels 1-5 in equal shares."""
    rng = random.Random(seed)
    problems = []
    for i in range(count):
        level = 1 + i % 5
        a, op, b = _toy_operands(level, rng)
        problems.append(Problem(f"{a}{op}{b}=", str(_OPS[op](a, b)), level))
    rng.shuffle(problems)
    return problems


def load_problems(source: str, toy_size: int, seed: int) -> list[Problem]:
    """``"toy"`` (generated from ``seed``) or a JSONL path."""
    return toy_problems(toy_size, seed) if source == "toy" else load_jsonl(source)


class PromptSampler:
    """Endless shuffled passes over the problems; the position is (epoch, index), so a resumed
    run draws exactly the prompts the uninterrupted run would have drawn."""

    def __init__(self, size: int, seed: int, epoch: int = 0, index: int = 0):
        if size <= 0:
            raise ValueError("PromptSampler: no problems to sample")
        self.size, self.seed, self.epoch, self.index = size, seed, epoch, index
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def next(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.index == self.size:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(count - len(out), self.size - self.index)
            out.extend(self._order[self.index : self.index + take])
            self.index += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "size": self.size, "seed": self.seed}

    @classmethod
    def from_state(cls, state: dict) -> "PromptSampler":
        return cls(state["size"], state["seed"], state["epoch"], state["index"])
