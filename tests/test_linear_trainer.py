"""The trainer's choice of loss path: fused-linear for a transformers causal LM with a plain
``nn.Linear`` head (tied or not), the logits path otherwise, and ``Policy.loss_path`` says which."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import lens_kernels as lk  # noqa: E402
from lens_kernels.train.policy import Policy  # noqa: E402
from lens_kernels.train.rollout import Rollout  # noqa: E402
from lens_kernels.train.toy import build_toy_model, build_toy_tokenizer  # noqa: E402


def toy_rollout(vocab: int) -> Rollout:
    gen = torch.Generator().manual_seed(0)
    sequences = torch.randint(4, vocab, (4, 9), generator=gen)
    attention = torch.ones_like(sequences)
    attention[0, :2] = 0  # left padding of the first prompt
    completion = torch.ones(4, 5, dtype=torch.bool)
    completion[1, 3:] = False
    return Rollout(sequences, attention, 4, completion, torch.zeros(4, 5), [""] * 4)


@pytest.mark.parametrize("tied", [True, False])
def test_fused_linear_path_matches_the_logits_path(tied):
    tok = build_toy_tokenizer()
    model = build_toy_model(tok, 16, 1, 2, seed=0)
    if not tied:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    policy = Policy.wrap(model, tok, "cpu")
    assert policy.fused_head_reason is None
    assert policy.loss_path.startswith(f"fused-linear (hidden states and the {'tied' if tied else 'separate'}")
    rollout = toy_rollout(len(tok))
    rows = torch.arange(4)
    hidden, weight, bias = policy.completion_hidden(rollout, rows)
    logits = policy.completion_logits(rollout, rows)
    torch.testing.assert_close(hidden @ weight.T, logits, rtol=1e-5, atol=1e-5)
    targets, mask = rollout.completion_ids, rollout.completion_mask
    options = dict(group_size=2, backend="torch")
    fused = lk.fused_linear_lens_loss(hidden, weight, targets, mask, torch.tensor([1.0, 0, 0, 1]), **options)
    plain = lk.fused_lens_loss(logits, targets, mask, torch.tensor([1.0, 0, 0, 1]), **options)
    torch.testing.assert_close(fused.loss, plain.loss)
    torch.testing.assert_close(fused.logprobs, torch.where(mask, plain.logprobs, 0))


def test_other_heads_fall_back_to_logits_and_say_why():
    tok = build_toy_tokenizer()
    model = build_toy_model(tok, 16, 1, 2, seed=0)
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(16, len(tok), bias=False))
    policy = Policy.wrap(model, tok, "cpu")
    assert policy.fused_head_reason == "the output head is Sequential, not a plain torch.nn.Linear"
    assert policy.loss_path.startswith("logits then fused_lens_loss (the output head is Sequential")
