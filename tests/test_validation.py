"""SPEC section 3: bad input raises the promised error, naming the argument, before any kernel."""
from __future__ import annotations

import pytest
import torch

import lens_kernels as lk
from lens_kernels.testing import make_problem


def problem(**overrides):
    kwargs = make_problem(batch=4, length=5, vocab=37, group_size=2)
    kwargs.update(overrides)
    return kwargs


BAD = {
    # id: (overrides, error type, text the message must contain)
    "logits-2d": (dict(logits=torch.randn(4, 37)), ValueError, "logits"),
    "logits-int": (dict(logits=torch.zeros(4, 5, 37, dtype=torch.int32)), TypeError, "logits"),
    "logits-complex": (dict(logits=torch.zeros(4, 5, 37, dtype=torch.complex64)), TypeError, "logits"),
    "targets-shape": (dict(target_ids=torch.zeros(4, 6, dtype=torch.int64)), ValueError, "target_ids"),
    "targets-int32": (dict(target_ids=torch.zeros(4, 5, dtype=torch.int32)), TypeError, "target_ids"),
    "targets-too-large": (dict(target_ids=torch.full((4, 5), 37)), ValueError, "target_ids"),
    "targets-negative": (dict(target_ids=torch.full((4, 5), -1)), ValueError, "target_ids"),
    "mask-shape": (dict(completion_mask=torch.ones(4, 4, dtype=torch.bool)), ValueError, "completion_mask"),
    "mask-values": (dict(completion_mask=torch.full((4, 5), 2.0)), ValueError, "completion_mask"),
    "rewards-shape": (dict(rewards=torch.zeros(5)), ValueError, "rewards"),
    "rewards-int": (dict(rewards=torch.zeros(4, dtype=torch.int64)), TypeError, "rewards"),
    "rewards-above-1": (dict(rewards=torch.tensor([0.0, 1.5, 0.0, 1.0])), ValueError, "rewards"),
    "rewards-negative": (dict(rewards=torch.tensor([0.0, -0.1, 0.0, 1.0])), ValueError, "rewards"),
    "rewards-nan": (dict(rewards=torch.tensor([0.0, float("nan"), 0.0, 1.0])), ValueError, "rewards"),
    "group-size-indivisible": (dict(group_size=3), ValueError, "group_size"),
    "group-size-1": (dict(group_size=1), ValueError, "group_size"),
    "group-size-float": (dict(group_size=2.0), ValueError, "group_size"),
    "groups-both": (dict(group_index=torch.tensor([0, 0, 1, 1])), ValueError, "group_index"),
    "groups-neither": (dict(group_size=None), ValueError, "group_size"),
    "group-index-singleton": (dict(group_size=None, group_index=torch.tensor([0, 0, 0, 1])), ValueError, "group_index"),
    "group-index-dtype": (dict(group_size=None, group_index=torch.tensor([0.0, 0, 1, 1])), TypeError, "group_index"),
    "old-logprobs-shape": (dict(old_logprobs=torch.zeros(4, 4)), ValueError, "old_logprobs"),
    "ref-logprobs-int": (dict(ref_logprobs=torch.zeros(4, 5, dtype=torch.int64)), TypeError, "ref_logprobs"),
    "temperature-zero": (dict(temperature=0.0), ValueError, "temperature"),
    "temperature-negative": (dict(temperature=-1.0), ValueError, "temperature"),
    "temperature-inf": (dict(temperature=float("inf")), ValueError, "temperature"),
    "alpha-negative": (dict(alpha=-0.1), ValueError, "alpha"),
    "mode-unknown": (dict(mode="ppo"), ValueError, "mode"),
    "agg-unknown": (dict(loss_agg_mode="mean"), ValueError, "loss_agg_mode"),
    "backend-unknown": (dict(backend="jax"), ValueError, "backend"),
    "eps-low-1": (dict(eps_low=1.0), ValueError, "eps_low"),
    "eps-high-negative": (dict(eps_high=-0.2), ValueError, "eps_high"),
    "clip-ratio-c-1": (dict(clip_ratio_c=1.0), ValueError, "clip_ratio_c"),
    "beta-without-ref": (dict(beta=0.1), ValueError, "beta"),
    "beta-negative": (dict(beta=-0.1), ValueError, "beta"),
    "std-eps-negative": (dict(std_eps=-1.0), ValueError, "std_eps"),
    "std-eps-zero": (dict(std_eps=0.0), ValueError, "std_eps"),
    "length-gamma-1": (dict(length_gamma=1.0), ValueError, "length_gamma"),
    "length-gamma-0": (dict(length_gamma=0.0), ValueError, "length_gamma"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_naming_the_argument(case):
    overrides, error, name = BAD[case]
    kwargs = problem(**{"backend": "torch", **overrides})
    with pytest.raises(error, match=name):
        lk.fused_lens_loss(**kwargs)
    if name != "backend":  # the reference accepts and ignores ``backend``
        with pytest.raises(error, match=name):
            lk.reference.fused_lens_loss(**kwargs)


def test_inplace_backward_refuses_overlapping_logits():
    kwargs = problem()
    kwargs["logits"] = kwargs["logits"][:, :1].expand(4, 5, 37)
    with pytest.raises(ValueError, match="inplace_backward"):
        lk.fused_lens_loss(**kwargs, backend="torch", inplace_backward=True)
    sliced = problem()  # a strided, non-overlapping view is fine
    assert sliced["logits"].stride() != sliced["logits"].contiguous().stride()
    lk.fused_lens_loss(**sliced, backend="torch", inplace_backward=True)


def test_device_mismatch_is_named():
    kwargs = problem(rewards=torch.zeros(4, device="meta"))
    with pytest.raises(ValueError, match="rewards.*device"):
        lk.fused_lens_loss(**kwargs)


def test_unavailable_backend_is_named():
    """The CUDA backend never runs on CPU tensors: asking for it names the argument."""
    with pytest.raises(ValueError, match="backend: 'cuda' is not available"):
        lk.fused_lens_loss(**problem(), backend="cuda")


@pytest.mark.parametrize("where", ["masked", "unmasked"])
def test_non_finite_logits(where):
    kwargs = problem()
    logits = kwargs["logits"].clone()
    mask = kwargs["completion_mask"]
    b, t = (mask if where == "masked" else ~mask).nonzero()[0].tolist()
    logits[b, t, :] = float("nan")
    kwargs["logits"] = logits
    if where == "masked":
        with pytest.raises(ValueError, match=r"logits: expected finite values.*first at \[%d, %d\]" % (b, t)):
            lk.fused_lens_loss(**kwargs, backend="torch")
        out = lk.fused_lens_loss(**kwargs, backend="torch", check_values=False)
        assert not torch.isfinite(out.loss)
    else:
        leaf = kwargs["logits"].requires_grad_()
        out = lk.fused_lens_loss(**kwargs, backend="torch")
        (grad,) = torch.autograd.grad(out.loss, leaf)
        assert torch.isfinite(out.loss), "an unmasked NaN position must not reach the loss"
        assert torch.isfinite(grad).all(), "an unmasked NaN position must get a zero gradient"


def test_token_logprobs_and_lens_advantages_check_their_arguments():
    kwargs = problem()
    with pytest.raises(ValueError, match="temperature"):
        lk.token_logprobs(kwargs["logits"], kwargs["target_ids"], temperature=0)
    with pytest.raises(ValueError, match="target_ids"):
        lk.token_logprobs(kwargs["logits"], kwargs["target_ids"] + 100)
    with pytest.raises(ValueError, match="group_size"):
        lk.lens_advantages(torch.zeros(4, 5), kwargs["completion_mask"], kwargs["rewards"], group_size=3)
    with pytest.raises(ValueError, match="mode"):
        lk.lens_advantages(torch.zeros(4, 5), kwargs["completion_mask"], kwargs["rewards"], group_size=2, mode="x")
