"""The paper's theory on an exactly enumerable toy (section 4.1: one question, six answers).

The policy is a categorical ``softmax(theta)`` over answers A..F; every answer is a one-token
completion, so ``pibar`` is the answer's probability.  Expectations over ``o ~ pi`` are exact
sums.  The calibrated reward is the package's own ``reference.calibrated_rewards`` with one
row per group, where the practical ``1/G`` scaling of section 5.1 is 1 and the formula is
exactly eq. (10); gradients of ``log pi`` come from the package's ``token_logprobs``.
"""
from __future__ import annotations

import pytest
import torch

import lens_kernels as lk
from lens_kernels.groups import contiguous_groups

ANSWERS = 6


def log_pi(theta: torch.Tensor) -> torch.Tensor:
    """``log pi(o)`` for each answer ``o`` through the package's token log-probs ``[K]``."""
    logits = theta.expand(ANSWERS, ANSWERS).unsqueeze(1)  # [B=K, T=1, V=K]
    targets = torch.arange(ANSWERS).unsqueeze(1)
    return lk.token_logprobs(logits, targets, backend="torch").squeeze(1).double()


def calibrated(pi: torch.Tensor, rewards: torch.Tensor, difficulty: float) -> torch.Tensor:
    """Eq. (10) for every answer, with the true difficulty ``D``."""
    groups = contiguous_groups(ANSWERS, 1).tensors(pi.device)
    d = torch.full((ANSWERS,), difficulty, dtype=torch.float64)
    return lk.reference.calibrated_rewards(pi, torch.ones_like(pi), rewards, d, groups)


def w(z: torch.Tensor) -> torch.Tensor:
    """Eq. (13): ``w(z) = (1/z) log(1/(1-z)) - 1``."""
    return -torch.log1p(-z) / z - 1


def expected_calibrated_gradient(theta: torch.Tensor, p_star: torch.Tensor, difficulty: float):
    """``E_{o~pi} E_{r~Bern(p*)} [rt(o, r) grad log pi(o)]``, exactly."""
    theta = theta.detach().float().requires_grad_()
    logp = log_pi(theta)
    pi = logp.detach().exp()
    rt_correct = calibrated(pi, torch.ones(ANSWERS, dtype=torch.float64), difficulty)
    rt_wrong = calibrated(pi, torch.zeros(ANSWERS, dtype=torch.float64), difficulty)
    expected_rt = p_star * rt_correct + (1 - p_star) * rt_wrong
    (grad,) = torch.autograd.grad((pi * expected_rt * logp).sum(), theta)
    return grad.double()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibrated_policy_gradient_is_the_gradient_of_j_mle(seed):
    """Theorem 2 (eq. 11-13): on-policy, E[rt grad log pi] = grad (J+ - J-), D held fixed."""
    torch.manual_seed(seed)
    r_star = torch.tensor([1.0, 1.0, 0, 0, 0, 0], dtype=torch.float64)  # A and B correct
    difficulty = 1.0 / float(r_star.sum())  # eq. (5): D = 1/2
    theta = torch.randn(ANSWERS, dtype=torch.float64)
    theta[2:] -= 1.0  # keep every wrong answer below D so w is defined

    policy_gradient = expected_calibrated_gradient(theta, r_star, difficulty)

    theta64 = theta.clone().requires_grad_()
    pi = torch.softmax(theta64, -1)
    wrong = r_star == 0
    assert float(pi.detach()[wrong].max()) < difficulty
    j_plus = (pi * r_star).sum()
    j_minus = (pi[wrong] * w(pi[wrong] / difficulty)).sum()  # (1 - r*) = 0 elsewhere
    (mle_gradient,) = torch.autograd.grad(j_plus - j_minus, theta64)

    torch.testing.assert_close(policy_gradient, mle_gradient, rtol=1e-5, atol=1e-7)
    plain = expected_calibrated_gradient(theta, r_star, float("inf"))  # no penalty: REINFORCE
    assert (plain - mle_gradient).abs().max() > 1e-3, "the penalty term must matter in this toy"


def test_expected_calibrated_gradient_vanishes_at_the_true_optimum():
    """Appendix B.1: with fractional p*, at pi* = D p* the expected calibrated gradient is 0,
    and it is not 0 elsewhere."""
    p_star = torch.tensor([0.9, 0.5, 0.3, 0.2, 0.1, 0.05], dtype=torch.float64)
    difficulty = 1.0 / float(p_star.sum())
    theta_star = torch.log(difficulty * p_star)

    at_optimum = expected_calibrated_gradient(theta_star, p_star, difficulty)
    assert at_optimum.abs().max() < 1e-6, f"gradient at the optimum: {at_optimum}"

    elsewhere = expected_calibrated_gradient(theta_star + torch.tensor([0.5, 0, 0, 0, 0, -0.5]), p_star, difficulty)
    assert elsewhere.abs().max() > 1e-3
    plain_reinforce = expected_calibrated_gradient(theta_star, p_star, float("inf"))
    assert plain_reinforce.abs().max() > 1e-3, "plain REINFORCE does not stop at pi* = D p*"


@pytest.mark.parametrize("rewards", [[1.0, 1, 0, 0, 0, 0], [0.0, 0, 0, 0, 0, 1], [0.0] * 6], ids=["two-right", "one-right", "negative"])
def test_group_difficulty_is_the_overestimated_importance_sampling_estimate(rewards):
    """Eq. (14) and section 5.1: ``D = max(G / sum r/pibar, 2 max pibar)``; ``2 max pibar``
    for a negative group; and the calibrated rewards then lie in ``[-1/G, 1]``."""
    r = torch.tensor(rewards, dtype=torch.float64)
    pi = torch.softmax(3 * torch.randn(ANSWERS, dtype=torch.float64), -1)
    groups = contiguous_groups(ANSWERS, ANSWERS).tensors(pi.device)
    difficulty = lk.reference.group_difficulty(pi, r, groups).item()
    peak = 2 * float(pi.max())
    expected = peak if r.sum() == 0 else max(ANSWERS / float((r / pi).sum()), peak)
    assert difficulty == pytest.approx(expected, rel=1e-12)
    rt = lk.reference.calibrated_rewards(pi, torch.ones_like(pi), r, torch.tensor([difficulty], dtype=torch.float64), groups)
    assert float(rt.min()) >= -1 / ANSWERS - 1e-12 and float(rt.max()) <= 1
