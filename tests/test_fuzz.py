"""Seeded fuzz test (issues 11 and 20): random shapes, dtypes, strides, masks, non-finite
values, extreme values (old log-probs down to -1e30, advantages of 1e30), values only the value
checks reject (with the checks off as well as on) and options thrown at every runnable backend
(cuda: csrc/ emulated on the CPU).  Each call either raises ``ValueError`` / ``TypeError``
naming an argument, or returns what ``lk.reference`` returns on the same inputs (NaN where it
gives NaN, the gradient non-finite in the same rows), with the inputs unchanged.  Cases are
tiny: Triton runs through the interpreter on CPU.
"""
from __future__ import annotations

import inspect
import random
import re

import pytest
import torch

import lens_kernels as lk
from lens_kernels.config import LOSS_AGG_MODES, MODES

from .conftest import DEVICE
from .test_unchecked_inputs import backend  # noqa: F401  (fixture: every backend, cuda emulated on the CPU)

ARGUMENTS = set(inspect.signature(lk.fused_lens_loss).parameters)
NAMED = re.compile(r"^([a-z_]+)( / ([a-z_]+))?: ")
CASES = 120  # per backend
NONFINITE = (float("nan"), float("inf"), float("-inf"))

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


def _case(rng: random.Random):
    """One random call: ``(tensors, options)``; tensors as the caller passes them."""
    groups = rng.choice([2, 3])
    batch = rng.choice([0, groups, 2 * groups])
    length, vocab = rng.randint(1, 4), rng.choice([1, 3, 7, 17])
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    base = torch.randn(batch, length + 1, vocab + 2, generator=gen) * 3
    layout = rng.choice(["contiguous", "sliced", "transposed"])
    if layout == "sliced":  # the usual model_logits[:, :-1], and a vocabulary slice
        logits = base.to(dtype)[:, :-1, 1:-1]
    elif layout == "transposed":
        logits = base[:, :-1, :vocab].to(dtype).transpose(0, 1).contiguous().transpose(0, 1)
    else:
        logits = base[:, :-1, :vocab].to(dtype).contiguous()
    targets = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.rand(batch, length, generator=gen) < rng.choice([0.0, 0.5, 1.0])
    targets = torch.where(mask, targets, torch.full_like(targets, rng.choice([-100, 0, vocab])))
    if rng.random() < 0.5:
        mask = mask.float()
    rewards = (torch.rand(batch, generator=gen) < 0.5).float()
    options = dict(check_values=rng.random() < 0.6)
    tensors = dict(logits=logits, target_ids=targets, completion_mask=mask, rewards=rewards)
    if rng.random() < 0.4:
        tensors["old_logprobs"] = -torch.rand(batch, length, generator=gen) * 3
    if rng.random() < 0.3:
        tensors["ref_logprobs"] = -torch.rand(batch, length, generator=gen) * 3
        options["beta"] = rng.choice([0.0, 0.1])
    if rng.random() < 0.2:
        tensors["advantages"] = torch.randn(batch, generator=gen)
    elif rng.random() < 0.3 and batch:
        tensors["group_index"] = torch.arange(batch // groups).repeat_interleave(groups)[torch.randperm(batch, generator=gen)]
    else:
        options["group_size"] = groups
    options["mode"] = rng.choice(MODES)
    options["loss_agg_mode"] = rng.choice(LOSS_AGG_MODES)
    for name, choices in (("clip_ratio_c", [3.0]), ("temperature", [0.7, 1.5]), ("length_gamma", [0.9]),
                          ("scale_by_std", [False]), ("alpha", [0.0, 0.5])):
        if rng.random() < 0.2:
            options[name] = rng.choice(choices)
    # some bad input, one at a time
    trouble = rng.choice(["none", "none", "nonfinite", "nonfinite", "extreme", "option", "value", "shape"])
    if trouble == "nonfinite" and batch:
        name = rng.choice([n for n in ("logits", "old_logprobs", "ref_logprobs", "advantages") if n in tensors])
        t = tensors[name] if name != "logits" else logits
        t = t.clone() if name != "logits" else t
        index = tuple(rng.randrange(s) for s in t.shape)
        with torch.no_grad():
            if name == "logits" and rng.random() < 0.5:
                t[index[:2]] = float("-inf")  # a whole row
            else:
                t[index] = rng.choice(NONFINITE)
        tensors[name] = t
    elif trouble == "extreme" and batch:  # accepted by the checks: a finite loss and gradient
        name = rng.choice(["old_logprobs", "ref_logprobs", "advantages"])
        if name == "advantages":
            tensors.pop("group_index", None)
            options.pop("group_size", None)
            tensors[name] = torch.randn(batch, generator=gen).sign() * 1e30
        else:
            t = tensors.get(name, -torch.rand(batch, length, generator=gen) * 3).clone()
            t[rng.randrange(batch)] = rng.choice([-1000.0, -1e30])
            tensors[name] = t
            if name == "ref_logprobs":
                options["beta"] = rng.choice([0.0, 0.1])
    elif trouble == "option":
        name, value = rng.choice([("alpha", -1.0), ("temperature", 0.0), ("eps_low", 1.5), ("mode", "ppo"),
                                  ("loss_agg_mode", "mean"), ("scale_by_std", "no"), ("backend", "tpu"),
                                  ("group_size", 1), ("check_values", 1), ("std_eps", 0.0)])
        options[name] = value
    elif trouble == "value" and batch:
        # values only the value checks catch: with them off, one outcome on every backend
        name = rng.choice(["rewards", "target_ids", "completion_mask"])
        t = tensors[name].clone()
        if name == "rewards":
            t[0] = rng.choice([2.0, -0.5, float("nan")])
        elif name == "target_ids":
            t[0, 0] = rng.choice([vocab, -100])
            mask = tensors["completion_mask"].clone()
            mask[0, 0] = 1
            tensors["completion_mask"] = mask
        else:
            t = t.float()
            t[0, 0] = rng.choice([2.0, 0.5])
        tensors[name] = t
    elif trouble == "shape":
        name = rng.choice(["target_ids", "completion_mask", "rewards"])
        t = tensors[name]
        tensors[name] = t[:-1] if t.dim() == 1 or rng.random() < 0.5 else t[:, :-1]
    return tensors, options


def _call(fn, tensors, options, **extra):
    logits = tensors["logits"].to(DEVICE).requires_grad_()  # the caller's tensor, strides and all
    rest = {k: v.to(DEVICE) for k, v in tensors.items() if k != "logits"}
    out = fn(logits, rest.pop("target_ids"), rest.pop("completion_mask"), rest.pop("rewards"),
             **rest, **{**extra, **options})
    (grad,) = torch.autograd.grad(out.loss, logits, allow_unused=True)
    return out, grad


def _close(a, b, dtype, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    a, b = a.double().cpu(), b.double().cpu()
    finite = torch.isfinite(b)
    assert torch.equal(torch.isnan(a), torch.isnan(b)), what  # NaN exactly where the reference has NaN
    assert torch.equal(a[torch.isinf(b)], b[torch.isinf(b)]), what
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(a[finite], b[finite], rtol=tol, atol=tol), (what, a, b)


def test_fuzz(backend):
    rng = random.Random(f"lens-fuzz-{backend}")
    outcomes = {"error": 0, "result": 0}
    for case in range(CASES):
        tensors, options = _case(rng)
        before = {k: v.detach().clone() for k, v in tensors.items()}
        try:
            out, grad = _call(lk.fused_lens_loss, tensors, options, backend=backend)
        except (ValueError, TypeError) as error:
            named = NAMED.match(str(error))
            assert named and named.group(1) in ARGUMENTS, (case, str(error))
            outcomes["error"] += 1
        else:
            outcomes["result"] += 1
            ref, ref_grad = _call(lk.reference.fused_lens_loss, tensors, options)
            dtype = tensors["logits"].dtype
            for field in ("loss", "advantages", "confidence", "calibrated_rewards", "difficulty",
                          "negative_group_fraction", "clip_fraction", "kl"):
                _close(getattr(out, field), getattr(ref, field), dtype, (case, field, options))
            if grad is not None and ref_grad is not None:
                grad, ref_grad = grad.double().cpu(), ref_grad.double().cpu()
                finite = torch.isfinite(ref_grad)
                tol = 1e-4 if dtype == torch.float32 else 3e-2
                assert torch.allclose(grad[finite], ref_grad[finite], rtol=tol, atol=tol), (case, "grad", options)
                if torch.isfinite(ref.loss):  # no 0 * inf = NaN from a clipped or flat token (issue 20)
                    assert not ref_grad.isnan().any() and not grad.isnan().any(), (case, "grad NaN", options)
        for name, value in tensors.items():
            value = value.detach()
            assert torch.equal(value.isnan() if value.is_floating_point() else value,
                               before[name].isnan() if value.is_floating_point() else before[name]), name
            if value.is_floating_point():
                assert torch.equal(value.nan_to_num(0.0), before[name].nan_to_num(0.0)), name
    assert outcomes["error"] and outcomes["result"], outcomes
