"""pass@k evaluation: n samples per problem, the unbiased estimator, overall and per level.

``pass_at_k(n, c, k) = 1 - C(n - c, k) / C(n, k)`` (Chen et al., 2021): the probability that at
least one of k samples drawn without replacement from the n is correct.  The hard subset is
MATH levels 4-5, as in the paper's Figure 5.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import torch

from .data import Problem

HARD_LEVELS = (4, 5)


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def summarize(problems: Sequence[Problem], correct: Sequence[int], n: int,
              ks: Sequence[int]) -> dict[str, float]:
    """``eval/pass@k``, ``eval/hard/pass@k`` and ``eval/level{L}/pass@k`` (means over problems)."""
    subsets: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(problems):
        subsets["eval"].append(i)
        if p.level is not None:
            subsets[f"eval/level{p.level}"].append(i)
            if p.level in HARD_LEVELS:
                subsets["eval/hard"].append(i)
    out: dict[str, float] = {}
    for name in sorted(subsets):
        members = subsets[name]
        for k in ks:
            out[f"{name}/pass@{k}"] = sum(pass_at_k(n, correct[i], k) for i in members) / len(members)
        out[f"{name}/problems"] = len(members)
    return out


def evaluate(engine, verifier, problems: Sequence[Problem], prompt_ids: Sequence[Sequence[int]],
             n: int, ks: Sequence[int], temperature: float, top_p: float, max_new_tokens: int,
             batch_prompts: int, seed: int, progress: bool = False) -> dict[str, float]:
    """Sample ``n`` completions per problem (its own RNG stream, so training is unaffected);
    ``progress`` shows a bar counting problems."""
    from tqdm.auto import tqdm

    correct: list[int] = []
    failures = 0
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    bar = tqdm(total=len(problems), desc="eval", unit="problem", disable=not progress)
    with torch.random.fork_rng(devices=devices), bar:
        torch.manual_seed(seed)
        for start in range(0, len(problems), batch_prompts):
            chunk = problems[start : start + batch_prompts]
            rollout = engine.generate(prompt_ids[start : start + batch_prompts], n, temperature,
                                      top_p, max_new_tokens, seed=seed + start)
            verdicts = verifier.score(rollout.texts, [p.answer for p in chunk for _ in range(n)])
            failures += sum(v.status in ("timeout", "error") for v in verdicts)
            for i in range(len(chunk)):
                correct.append(sum(v.status == "correct" for v in verdicts[i * n : (i + 1) * n]))
            bar.update(len(chunk))
    out = summarize(problems, correct, n, ks)
    out["eval/verify_failures"] = failures
    return out
