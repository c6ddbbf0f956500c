"""Problems: MATH-style JSONL files, the built-in toy arithmetic task, and a resumable sampler.

A problem is ``Problem(problem, answer, level)``.  JSONL rows need ``problem`` and either
``answer`` or a ``solution`` whose last ``\\boxed{...}`` is the answer; ``level`` is optional
(an int 1-5 or MATH's ``"Level 4"``).
"""
from __future__ import annotations

import json
import random
import re
from typing import NamedTuple, Optional

import torch

BOXED = "\\boxed"


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


def _level(value) -> Optional[int]:
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return value
    match = re.search(r"\d+", str(value))
    return int(match.group()) if match else None


def load_jsonl(path: str) -> list[Problem]:
    problems = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "problem" not in row:
                raise ValueError(f"{path}:{lineno}: missing 'problem'")
            answer = row.get("answer")
            if answer is None and "solution" in row:
                answer = last_boxed(row["solution"])
            if answer is None:
                raise ValueError(f"{path}:{lineno}: needs 'answer' or a \\boxed{{}} 'solution'")
            problems.append(Problem(row["problem"], str(answer), _level(row.get("level"))))
    if not problems:
        raise ValueError(f"{path}: no problems")
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
