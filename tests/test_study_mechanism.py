"""The mechanism metrics on a tiny batch against values computed by hand: the negative groups'
share of the gradient (exactly 0 under GRPO; under LENS the norms of the two parts, recomputed
group by group), the mean confidence of wrong and correct completions, accuracy per level."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

import lens_kernels as lk  # noqa: E402
from lens_kernels.train.config import resolve_config  # noqa: E402
from lens_kernels.train.mechanism import grad_share  # noqa: E402
from lens_kernels.train.policy import Policy  # noqa: E402
from lens_kernels.train.ppo import ppo_update  # noqa: E402
from lens_kernels.train.rollout import rollout_from_lists  # noqa: E402
from lens_kernels.train.toy import build_toy_model, build_toy_tokenizer  # noqa: E402
from lens_kernels.train.trainer import level_accuracy  # noqa: E402

G = 4
# Three groups: mixed, negative, mixed.
REWARDS = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 0])
# Row b's completion has b % 3 + 1 tokens, each with old log-prob log(0.2 + 0.05 * b), so its
# confidence pibar_b (the geometric-mean probability) is 0.2 + 0.05 * b.
PIBAR = [0.2 + 0.05 * b for b in range(12)]


def _batch():
    tok = build_toy_tokenizer()
    prompts = [tok(p, add_special_tokens=False).input_ids for p in ["3+4=", "12-5=", "7*3="]]
    completions = [tok("\\boxed{" + "7" * (b % 3) + "}", add_special_tokens=False).input_ids[: b % 3 + 1]
                   for b in range(12)]
    old_rows = [[math.log(PIBAR[b])] * len(c) for b, c in enumerate(completions)]
    rollout = rollout_from_lists(tok, prompts, G, completions, old_rows, [tok.eos_token_id], "cpu")
    return tok, rollout, rollout.sampler_logprobs.clone()


def _update(mode: str, measure: bool):
    tok, rollout, old = _batch()
    config = resolve_config(None, {"group_size": G, "prompts_per_step": 3, "minibatch_prompts": 0,
                                   "max_grad_norm": 1e9})
    policy = Policy.wrap(build_toy_model(tok, 32, 1, 2, seed=0), tok, "cpu")
    sgd = torch.optim.SGD(policy.model.parameters(), lr=1.0)
    stats = ppo_update(policy, sgd, rollout, REWARDS, old, None, config, mode,
                       measure_grad_share=measure)
    return stats, [p.detach().clone() for p in policy.model.parameters()], (tok, rollout, old)


def _group_grad_norm(mode: str, rows: list[int], tok, rollout, old) -> float:
    """||d/dtheta of those whole groups' part of the minibatch loss||: the loss of the groups
    alone times their share (len(rows) / 12 rows, seq-mean-token-mean), at the start weights."""
    policy = Policy.wrap(build_toy_model(tok, 32, 1, 2, seed=0), tok, "cpu")
    index = torch.tensor(rows)
    out = lk.fused_lens_loss(policy.completion_logits(rollout, index), rollout.completion_ids[index],
                             rollout.completion_mask[index], REWARDS[index], group_size=G,
                             old_logprobs=old[index], mode=mode)
    (out.loss * len(rows) / 12).backward()
    return math.sqrt(sum(float((p.grad ** 2).sum()) for p in policy.model.parameters()
                         if p.grad is not None))


def test_negative_groups_carry_no_gradient_under_grpo():
    stats, _, _ = _update("grpo", measure=True)
    assert stats["grad_share_negative_groups"] == 0.0
    assert stats["grad_norm_negative_groups"] == 0.0
    assert stats["grad_norm_other_groups"] > 0


@pytest.mark.parametrize("mode", ["lens", "lens-negative-only"])
def test_negative_group_gradient_share_by_hand(mode):
    stats, _, (tok, rollout, old) = _update(mode, measure=True)
    negative = _group_grad_norm(mode, [4, 5, 6, 7], tok, rollout, old)
    others = _group_grad_norm(mode, [0, 1, 2, 3, 8, 9, 10, 11], tok, rollout, old)
    assert negative > 0
    assert stats["grad_norm_negative_groups"] == pytest.approx(negative, rel=1e-4)
    assert stats["grad_norm_other_groups"] == pytest.approx(others, rel=1e-4)
    assert stats["grad_share_negative_groups"] == pytest.approx(negative / (negative + others),
                                                                rel=1e-4)


def test_measuring_leaves_the_update_unchanged():
    _, measured, _ = _update("lens", measure=True)
    stats, plain, _ = _update("lens", measure=False)
    assert "grad_share_negative_groups" not in stats
    assert all(torch.equal(a, b) for a, b in zip(measured, plain))


def test_confidence_of_wrong_and_correct_completions_by_hand():
    stats, _, _ = _update("lens", measure=False)
    wrong = [p for p, r in zip(PIBAR, REWARDS.tolist()) if r == 0]
    right = [p for p, r in zip(PIBAR, REWARDS.tolist()) if r == 1]
    assert stats["confidence_wrong_mean"] == pytest.approx(sum(wrong) / len(wrong), rel=1e-5)
    assert stats["confidence_correct_mean"] == pytest.approx(sum(right) / len(right), rel=1e-5)


def test_grad_share_from_norms_and_dot_product():
    # g_neg = (3, 0), g_total = (3, 4): g_rest = (0, 4)
    assert grad_share(9.0, 25.0, 9.0) == pytest.approx(
        {"grad_share_negative_groups": 3 / 7, "grad_norm_negative_groups": 3.0,
         "grad_norm_other_groups": 4.0})
    assert grad_share(0.0, 0.0, 0.0)["grad_share_negative_groups"] == 0.0
    with pytest.raises(ValueError, match="squared norms"):
        grad_share(-1.0, 1.0, 0.0)


def test_accuracy_per_level_by_hand():
    statuses = ["correct", "wrong", "correct", "correct", "no_answer", "correct", "wrong", "wrong"]
    # prompts of levels 1, 4, 1 and one without a level; G = 2
    assert level_accuracy([1, 4, 1, None], statuses, 2) == {
        "accuracy/level1": 2 / 4, "accuracy/level4": 2 / 2}
