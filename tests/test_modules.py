"""``lk.LensLoss`` and ``lk.FusedLinearLensLoss``: the same outputs and gradients as the
functions they wrap, options checked at construction, no state, options in ``repr``."""
from __future__ import annotations

import re

import pytest
import torch

import lens_kernels as lk

from .test_linear_loss import make_linear_problem

FIELDS = ("loss", "logprobs", "advantages", "calibrated_rewards", "confidence", "difficulty",
          "negative_group_fraction", "clip_fraction", "kl")
OPTIONS = dict(group_size=4, mode="lens", eps_high=0.28, clip_ratio_c=3.0, beta=0.05, temperature=0.8,
               loss_agg_mode="token-mean", backend="torch")


def problem():
    hidden, weight, bias, kwargs = make_linear_problem(off_policy=0.3, with_ref=True, temperature=0.8)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("group_size", "temperature")}
    return hidden, weight, bias, kwargs


def outputs_and_grads(call, leaves):
    leaves = [t.detach().requires_grad_() for t in leaves]
    out = call(*leaves)
    return out, torch.autograd.grad(out.loss, leaves)


def assert_same(out, grads, expected, expected_grads):
    for field in FIELDS:
        value, gold = getattr(out, field), getattr(expected, field)
        assert (value is None) == (gold is None) and (value is None or torch.equal(value, gold)), field
    for value, gold in zip(grads, expected_grads):
        assert torch.equal(value, gold)


def test_lens_loss_module_equals_the_function():
    hidden, weight, bias, kwargs = problem()
    logits = hidden @ weight.T + bias
    module = lk.LensLoss(**OPTIONS)
    out, grads = outputs_and_grads(lambda z: module(z, **kwargs), [logits])
    expected, expected_grads = outputs_and_grads(lambda z: lk.fused_lens_loss(z, **kwargs, **OPTIONS), [logits])
    assert_same(out, grads, expected, expected_grads)
    assert out.kl is not None and out.loss.requires_grad


def test_fused_linear_module_equals_the_function():
    hidden, weight, bias, kwargs = problem()
    module = lk.FusedLinearLensLoss(**OPTIONS)
    out, grads = outputs_and_grads(lambda h, w, b: module(h, w, bias=b, **kwargs), [hidden, weight, bias])
    expected, expected_grads = outputs_and_grads(
        lambda h, w, b: lk.fused_linear_lens_loss(h, w, bias=b, **kwargs, **OPTIONS), [hidden, weight, bias])
    assert_same(out, grads, expected, expected_grads)


@pytest.mark.parametrize("cls", [lk.LensLoss, lk.FusedLinearLensLoss])
def test_no_state_and_options_in_repr(cls):
    module = cls(group_size=8, eps_high=0.28)
    assert module.state_dict() == {} and list(module.parameters()) == []
    text = repr(module)
    assert text.startswith(cls.__name__ + "(") and "group_size=8" in text and "eps_high=0.28" in text
    assert "mode='lens'" in text and "backend='auto'" in text  # defaults shown too
    assert ("gemm='auto'" in text) == (cls is lk.FusedLinearLensLoss)


@pytest.mark.parametrize(
    "cls, options, error, message",
    [
        (lk.LensLoss, dict(mode="ppo"), ValueError, "mode: expected one of"),
        (lk.LensLoss, dict(eps_low=1.5), ValueError, "eps_low: expected a value in [0.0, 1.0)"),
        (lk.LensLoss, dict(temperature=0.0), ValueError, "temperature: expected a value in (0.0, inf)"),
        (lk.LensLoss, dict(group_size=1), ValueError, "group_size: expected an int >= 2 or None, got 1"),
        (lk.LensLoss, dict(backend="jax"), ValueError, "backend: expected one of"),
        (lk.LensLoss, dict(old_logprobs=None), TypeError, "LensLoss: old_logprobs is a tensor of forward()"),
        (lk.LensLoss, dict(eps=0.2), TypeError, "LensLoss: unknown option 'eps'"),
        (lk.FusedLinearLensLoss, dict(gemm="cublas"), ValueError, "gemm: expected one of"),
        (lk.FusedLinearLensLoss, dict(inplace_backward=True), TypeError, "unknown option 'inplace_backward'"),
        (lk.FusedLinearLensLoss, dict(clip_ratio_c=0.5), ValueError, "clip_ratio_c: expected a value in (1.0"),
    ],
    ids=["mode", "eps-low", "temperature", "group-size", "backend", "tensor-as-option", "unknown", "gemm",
         "linear-inplace", "clip-ratio-c"],
)
def test_bad_options_fail_at_construction(cls, options, error, message):
    with pytest.raises(error, match=re.escape(message)):
        cls(**options)
