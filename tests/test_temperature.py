"""Temperature without a one-sided fp32 bias (issue 19 item 2), on every kernel backend.

``x * fp32(1 / t)`` gives every fp32 log-prob the same relative error (4.8e-8 at t = 0.9,
times |log p|), which at |logits| ~ 1e3 dominates the loss error.  The kernels scale by the
fp32 parts of ``config.split_float(1 / t)`` instead; these tests hold them to PyTorch's own
fp32 (``log_softmax(x / t)``, ``reference`` in fp32), against float64.
"""
from __future__ import annotations

import math
import struct

import pytest
import torch

import lens_kernels as lk
from lens_kernels import backends, reference
from lens_kernels.backends import kernel_loss
from lens_kernels.config import SPLIT_HI_BITS, LensOptions, split_float
from lens_kernels.groups import contiguous_groups

from .kernel_backends import kernel_backend  # noqa: F401  (fixture)

TAU = 0.9
# The issue's repro: token-mean, eps 0.2 / 0.4, dual clip 1.5, k3 KL with beta 0.04.
OPTIONS = dict(beta=0.04, eps_low=0.2, eps_high=0.4, clip_ratio_c=1.5, temperature=TAU, loss_agg_mode="token-mean")


def _fp32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


@pytest.mark.parametrize("temperature", [0.9, 0.7, 1.3, 0.6, 3.0, 1.0, 0.8, 0.25, 1e-3])
def test_split_float_parts(temperature):
    value = 1 / temperature
    hi, lo = split_float(value)
    assert _fp32(hi) == hi and _fp32(lo) == lo
    assert abs(hi + lo - value) <= 2**-34 * value
    assert _fp32(hi + lo) == _fp32(value), "hi + lo in fp32 must be the nearest fp32 of 1/t (gradients use it)"
    mantissa = hi / 2.0 ** (math.frexp(hi)[1] - SPLIT_HI_BITS)
    assert mantissa == int(mantissa), f"hi = {hi} has more than {SPLIT_HI_BITS} significant bits"
    if _fp32(value) == value and mantissa * 2.0 ** (math.frexp(hi)[1] - SPLIT_HI_BITS) == value:
        assert lo == 0.0
    else:  # lo has hi's sign and stands far above hi's last place in any product x * hi
        assert 2**-16 * value <= lo <= 2**-11 * value


def _repro(seed: int):
    """B=4, T=9, V=301, logits = 1000 * randn, old/ref = float64 log-probs + noise (<= 0)."""
    gen = torch.Generator().manual_seed(seed)
    batch, length, vocab = 4, 9, 301
    logits = 1000 * torch.randn(batch, length, vocab, generator=gen)
    target = torch.randint(0, vocab, (batch, length), generator=gen)
    gold = reference.token_logprobs(logits.double(), target, TAU)

    def noisy():
        return (gold + 2 * torch.randn(gold.shape, generator=gen, dtype=gold.dtype)).clamp(max=0).float()

    return dict(logits=logits, target_ids=target, completion_mask=torch.ones(batch, length, dtype=torch.bool),
                rewards=torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=2, old_logprobs=noisy(), ref_logprobs=noisy())


def _kernel_loss(name: str, device: torch.device, problem: dict) -> float:
    p = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in problem.items()}
    if name == "torch":
        return lk.fused_lens_loss(**p, **OPTIONS, backend="torch").loss.item()
    options = LensOptions(**OPTIONS, backend=name)
    groups = contiguous_groups(p["logits"].shape[0], p["group_size"])
    result = kernel_loss.one_pass(p["logits"], p["target_ids"], p["completion_mask"], p["rewards"], p["old_logprobs"],
                                  p["ref_logprobs"], None, groups, options, None)
    return result.loss.item()


def test_issue_repro_loss_as_close_as_pytorch_fp32(kernel_backend):
    """Relative loss errors over 8 seeds of the repro: the root mean square within 25 % of
    PyTorch's fp32 (``reference.fused_lens_loss`` in fp32; the per-token fp32 rounding at
    |z| ~ 1e3 is the same for both, ours was 3x larger before), and the mean signed error at
    most half of PyTorch's (ours has no one-sided part; it was twice PyTorch's before)."""
    name, device = kernel_backend
    ours, pytorch = [], []
    for seed in range(8):
        problem = _repro(seed)
        gold = reference.fused_lens_loss(**{**problem, "logits": problem["logits"].double()}, **OPTIONS).loss.item()
        fp32 = reference.fused_lens_loss(**problem, **OPTIONS, compute_dtype=torch.float32).loss.item()
        ours.append((_kernel_loss(name, device, problem) - gold) / abs(gold))
        pytorch.append((fp32 - gold) / abs(gold))
    rms = lambda e: math.sqrt(sum(x * x for x in e) / len(e))  # noqa: E731
    mean = lambda e: sum(e) / len(e)  # noqa: E731
    assert rms(ours) <= 1.25 * rms(pytorch), (
        f"{name}: rms relative loss error {rms(ours):.3g} > 1.25 x PyTorch fp32's {rms(pytorch):.3g}"
    )
    assert abs(mean(ours)) <= 0.5 * abs(mean(pytorch)), (
        f"{name}: mean signed relative loss error {mean(ours):.3g} (PyTorch fp32's {mean(pytorch):.3g})"
    )


def test_mean_signed_logprob_error_at_large_logits(kernel_backend):
    """At |logits| ~ 1e3 the mean signed fp32 log-prob error is no larger than that of
    PyTorch's ``log_softmax(x / t)`` (whose fp32(t) is itself one-sided), on 512 tokens."""
    name, device = kernel_backend
    gen = torch.Generator().manual_seed(1)
    logits = 1000 * torch.randn(1, 512, 301, generator=gen)
    target = torch.randint(0, 301, (1, 512), generator=gen)
    gold = reference.token_logprobs(logits.double(), target, TAU)
    native = torch.log_softmax(logits / TAU, -1).gather(-1, target[..., None])[..., 0]
    logp, _, _ = backends.get(name).logprobs_forward(logits.to(device), target.to(device), 1 / TAU)
    ours = (logp.cpu().double() - gold).mean().item()
    theirs = (native.double() - gold).mean().item()
    assert abs(ours) <= 0.25 * abs(theirs), f"{name}: mean signed log-prob error {ours:.3g} (PyTorch's {theirs:.3g})"
