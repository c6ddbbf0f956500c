"""Value errors name the argument, the first bad position and its value, and for log-probs that
cannot be log-probs (> 1e-4 at a masked position) what was likely passed instead."""
from __future__ import annotations

import re

import pytest
import torch

import lens_kernels as lk
from lens_kernels.testing import make_problem


def problem(**overrides):
    kwargs = make_problem(batch=4, length=5, vocab=37, group_size=2)
    kwargs["completion_mask"] = torch.ones(4, 5, dtype=torch.bool)
    kwargs["logits"] = kwargs["logits"].detach().requires_grad_()
    kwargs.update(overrides)
    return kwargs


def logprobs_with(position, value, base=-0.5):
    out = torch.full((4, 5), base)
    out[position] = value
    return out


def half_mask():
    mask = torch.ones(4, 5)
    mask[1, 2] = 0.5
    return mask


CASES = {
    # id: (overrides, the message's expected text, as a regular expression)
    "rewards-above-1": (dict(rewards=torch.tensor([0.0, 1.0, 1.5, 1.0])),
                        r"^rewards: expected values in \[0, 1\].*found 1\.5 at \[2\]$"),
    "rewards-nan": (dict(rewards=torch.tensor([0.0, float("nan"), 0.0, 7.0])), r"^rewards: .*found nan at \[1\]$"),
    "mask-half": (dict(completion_mask=half_mask()),
                  r"^completion_mask: expected bool or values in \{0, 1\}, found 0\.5 at \[1, 2\]$"),
    "old-probabilities": (dict(old_logprobs=torch.full((4, 5), 0.25)),
                          r"^old_logprobs: expected log-probabilities \(<= 0\) at masked positions, found 0\.25 "
                          r"at \[0, 0\] \(20 above 0\.0001\); probabilities\? pass their log$"),
    "old-negated": (dict(old_logprobs=logprobs_with((2, 3), 4.0, base=0.7)),
                    r"^old_logprobs: .*found 0\.7 at \[0, 0\] \(20 above 0\.0001\); negated log-probs .*sign flipped$"),
    "ref-one-positive": (dict(ref_logprobs=logprobs_with((3, 1), 0.002), beta=0.1),
                         r"^ref_logprobs: .*found 0\.002 at \[3, 1\] \(1 above 0\.0001\); some tokens' values are "
                         r"not log-probs"),
}


@pytest.mark.parametrize("overrides,pattern", CASES.values(), ids=CASES.keys())
def test_value_error_names_position_and_value(overrides, pattern):
    with pytest.raises(ValueError) as info:
        lk.fused_lens_loss(**problem(**overrides), backend="torch")
    assert re.search(pattern, str(info.value)), str(info.value)


def test_lens_advantages_refuses_probabilities_as_old_logprobs():
    kwargs = problem()
    with pytest.raises(ValueError, match=r"^old_logprobs: .*found 1 at \[0, 0\].*probabilities\? pass their log$"):
        lk.lens_advantages(torch.ones(4, 5), kwargs["completion_mask"], kwargs["rewards"], group_size=2)


def test_positive_logprobs_accepted_within_rounding_outside_the_mask_and_unchecked():
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[0, 4] = False
    old = logprobs_with((1, 1), 1e-5)  # rounding of a confident token's log-prob
    old[0, 4] = 3.0  # outside the mask: never read
    lk.fused_lens_loss(**problem(completion_mask=mask, old_logprobs=old), backend="torch")
    lk.fused_lens_loss(**problem(old_logprobs=torch.full((4, 5), 0.5)), backend="torch", check_values=False)
