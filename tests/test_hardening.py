"""Issue 11, items 1-6 ("The loss"): every bad input named, no silent NaN, backends agree.

Each test failed at 5814f69 (before the hardening) and passes now.  ``L``: logits
``[4, 5, 50]``, ``y`` and ``m`` all ones, ``r = [1, 0, 0, 0]``, ``group_size=2``.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import lens_kernels as lk
from lens_kernels import api

from .conftest import DEVICE, runnable_backends

BACKENDS = [b for b in runnable_backends() if b != "cuda"] if DEVICE == "cpu" else runnable_backends()
NAN, INF = float("nan"), float("inf")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter on NaN/inf


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 5, 50, generator=g).to(DEVICE)
    targets = torch.randint(0, 50, (4, 5), generator=g).to(DEVICE)
    mask = torch.ones(4, 5, dtype=torch.bool, device=DEVICE)
    rewards = torch.tensor([1.0, 0, 0, 0], device=DEVICE)
    return logits, targets, mask, rewards


def _logp(value: float, pos=(0, 1)) -> torch.Tensor:
    t = torch.full((4, 5), -3.0, device=DEVICE)
    t[pos] = value
    return t


def _run(fn, logits, targets, mask, rewards, **kw):
    x = logits.clone().requires_grad_()
    out = fn(x, targets, mask, rewards, **kw)
    (grad,) = torch.autograd.grad(out.loss, x)
    return out, grad


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5, equal_nan=True))


# ---------------------------------------------------------------- item 1, checks on
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,value", [("old_logprobs", NAN), ("old_logprobs", INF), ("old_logprobs", -INF),
                                        ("ref_logprobs", NAN), ("ref_logprobs", INF), ("ref_logprobs", -INF)])
def test_nonfinite_old_ref_raise_with_position(backend, name, value):
    L, y, m, r = _batch()
    kw = {name: _logp(value, (2, 3))}
    if name == "ref_logprobs":
        kw["beta"] = 0.1
    with pytest.raises(ValueError, match=rf"{name}: expected finite.*first at \[2, 3\]"):
        lk.fused_lens_loss(L, y, m, r, group_size=2, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_advantages_raise(backend):
    L, y, m, r = _batch()
    adv = torch.tensor([0.5, NAN, 1, 0], device=DEVICE)
    with pytest.raises(ValueError, match=r"advantages: expected finite.*first at \[1\]"):
        lk.fused_lens_loss(L, y, m, r, advantages=adv, backend=backend)


# ---------------------------------------------------------------- item 1 and 2, checks off
def _setter(name, value, masked_out=False):
    def apply(L, m, kw):
        kw[name] = _logp(value)
        if masked_out:
            m[0, 1] = False
    return apply


def _logit_row(value, masked_out=False):
    def apply(L, m, kw):
        L[1, 2] = value
        if masked_out:
            m[1, 2] = False
    return apply


CHECKS_OFF = {
    "old nan": (_setter("old_logprobs", NAN), {}),
    "old nan grpo": (_setter("old_logprobs", NAN), {"mode": "grpo"}),
    "old +inf": (_setter("old_logprobs", INF), {}),
    "old -inf": (_setter("old_logprobs", -INF), {}),
    "old nan masked-out": (_setter("old_logprobs", NAN, True), {}),
    "ref nan": (_setter("ref_logprobs", NAN), {"beta": 0.1}),
    "ref +inf": (_setter("ref_logprobs", INF), {"beta": 0.1}),
    "ref -inf": (_setter("ref_logprobs", -INF), {"beta": 0.1}),
    "all -inf row": (_logit_row(-INF), {}),  # item 2
    "all -inf row, old given": (_logit_row(-INF), {"old_logprobs": _logp(-3.0)}),
    "all -inf row, grpo": (_logit_row(-INF), {"mode": "grpo"}),
    "nan logits row": (_logit_row(NAN), {}),
    "all -inf row masked-out": (_logit_row(-INF, True), {}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CHECKS_OFF))
def test_checks_off_backends_agree_with_reference(backend, case):
    """With ``check_values=False`` the loss, advantages and confidences equal the reference's,
    NaN where it gives NaN; so does the gradient, finite in the same rows (the reference no
    longer makes 0 * inf = NaN at a clipped token, issue 20; which entries of an infinite
    token's row are inf or NaN is arithmetic)."""
    L, y, m, r = _batch()
    apply, kw = CHECKS_OFF[case]
    kw = dict(kw)
    apply(L, m, kw)
    ref, ref_grad = _run(lk.reference.fused_lens_loss, L, y, m, r, group_size=2, check_values=False, **kw)
    out, grad = _run(lk.fused_lens_loss, L, y, m, r, group_size=2, check_values=False, backend=backend, **kw)
    assert _same(out.loss, ref.loss), (out.loss, ref.loss)
    assert _same(out.advantages, ref.advantages), (out.advantages, ref.advantages)
    assert _same(out.confidence, ref.confidence), (out.confidence, ref.confidence)
    finite = torch.isfinite(ref_grad)
    assert _same(grad[finite], ref_grad[finite])
    assert torch.equal(torch.isfinite(grad).all(-1), finite.all(-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_inf_row_gives_nonfinite_loss(backend):
    """Item 2: the docs promise a non-finite loss for an all -inf completion row."""
    L, y, m, r = _batch()
    L[1, 2] = -INF
    out = lk.fused_lens_loss(L, y, m, r, group_size=2, backend=backend, check_values=False)
    assert not math.isfinite(out.loss.item())
    with pytest.raises(ValueError, match=r"logits: expected finite.*first at \[1, 2\]"):
        lk.fused_lens_loss(L, y, m, r, group_size=2, backend=backend)


# ---------------------------------------------------------------- item 3
@pytest.mark.parametrize("backend", BACKENDS)
def test_transformers_labels_at_masked_out_positions(backend):
    L, y, m, r = _batch()
    y, m = y.clone(), m.clone()
    m[:, :2] = False
    y[:, 0] = -100
    y[:, 1] = 50
    ref = lk.reference.fused_lens_loss(L, y, m, r, group_size=2)
    out = lk.fused_lens_loss(L, y, m, r, group_size=2, backend=backend)
    assert _same(out.loss, ref.loss)
    y[2, 3] = -100
    with pytest.raises(ValueError, match=r"target_ids: expected ids in \[0, 50\).*masked position.*-100 at \[2, 3\]"):
        lk.fused_lens_loss(L, y, m, r, group_size=2, backend=backend)


# ---------------------------------------------------------------- item 4
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grouping", ["group_size", "group_index"])
def test_empty_batch_gives_zeros(backend, grouping):
    L = torch.randn(0, 5, 50, device=DEVICE, requires_grad=True)
    y = torch.zeros(0, 5, dtype=torch.long, device=DEVICE)
    m = torch.ones(0, 5, dtype=torch.bool, device=DEVICE)
    r = torch.zeros(0, device=DEVICE)
    kw = {"group_size": 2} if grouping == "group_size" else {"group_index": torch.zeros(0, dtype=torch.long, device=DEVICE)}
    out = lk.fused_lens_loss(L, y, m, r, backend=backend, **kw)
    assert out.loss.item() == 0.0
    assert out.negative_group_fraction.item() == 0.0
    assert out.clip_fraction.item() == 0.0
    assert out.advantages.shape == (0,) and out.difficulty.shape == (0,)
    out.loss.backward()
    assert L.grad.shape == L.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", ["seq-mean-token-sum-norm", "token-mean", "seq-mean-token-sum"])
def test_empty_batch_every_aggregation(backend, agg):
    """Found by the fuzz test: the reference divided by ``B * T = 0`` (NaN) in token-sum-norm."""
    L, y, m, r = (torch.zeros(0, 3, 5, device=DEVICE), torch.zeros(0, 3, dtype=torch.long, device=DEVICE),
                  torch.ones(0, 3, device=DEVICE), torch.zeros(0, device=DEVICE))
    for fn, kw in ((lk.reference.fused_lens_loss, {}), (lk.fused_lens_loss, {"backend": backend})):
        assert fn(L, y, m, r, group_size=2, loss_agg_mode=agg, **kw).loss.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_plus_inf_logit_matches_reference(backend):
    """Found by the fuzz test: a +inf logit beside the target gives log-prob -inf (confidence
    0) on every backend; the reference's log_softmax made the whole row NaN."""
    L, y, m, r = _batch()
    y = torch.zeros_like(y)
    L[2, 1, 7] = INF
    ref = lk.reference.fused_lens_loss(L, y, m, r, group_size=2, check_values=False)
    out = lk.fused_lens_loss(L, y, m, r, group_size=2, check_values=False, backend=backend)
    assert ref.logprobs[2, 1].item() == -INF and ref.confidence[2].item() == 0.0
    assert _same(out.loss, ref.loss)  # NaN on every backend (on-policy ratio exp(-inf + inf))
    if backend == "torch":  # Triton's online softmax gives NaN, not -inf, beside a +inf logit
        assert _same(out.logprobs, ref.logprobs) and _same(out.confidence, ref.confidence)


@pytest.mark.parametrize("grouping", ["group_size", "group_index"])
def test_empty_batch_lens_advantages(grouping):
    m = torch.ones(0, 5, dtype=torch.bool)
    kw = {"group_size": 2} if grouping == "group_size" else {"group_index": torch.zeros(0, dtype=torch.long)}
    out = lk.lens_advantages(torch.zeros(0, 5), m, torch.zeros(0), **kw)
    assert out.negative_group_fraction.item() == 0.0
    assert out.advantages.shape == (0,)
    stats = lk.lens_advantages_from_stats(torch.zeros(0), torch.zeros(0), torch.zeros(0), **kw)
    assert stats.negative_group_fraction.item() == 0.0


# ---------------------------------------------------------------- item 5
@pytest.mark.parametrize("name", ["scale_by_std", "inplace_backward", "check_values"])
def test_booleans_must_be_bools(name):
    L, y, m, r = _batch()
    with pytest.raises(ValueError, match=rf"{name}: expected True or False, got 'no'"):
        lk.fused_lens_loss(L, y, m, r, group_size=2, **{name: "no"})


def test_numpy_scalars_accepted():
    L, y, m, r = _batch()
    ref = lk.reference.fused_lens_loss(L, y, m, r, group_size=2, alpha=0.25)
    out = lk.fused_lens_loss(L, y, m, r, group_size=np.int64(2), alpha=np.float32(0.25), temperature=np.float64(1.0))
    assert _same(out.loss, ref.loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_temperature_rejected(backend):
    L, y, m, r = _batch()
    with pytest.raises(ValueError, match=r"^temperature: .*inverse"):
        lk.fused_lens_loss(L, y, m, r, group_size=2, temperature=1e46, backend=backend)


def test_logits_one_position_too_long_suggest_shift():
    L, y, m, r = _batch()
    L = torch.randn(4, 6, 50, device=DEVICE)
    with pytest.raises(ValueError, match=r"disagree in T \(6 vs 5\).*\[:, :-1\]"):
        lk.fused_lens_loss(L, y, m, r, group_size=2)


def test_lens_advantages_device_names_its_argument():
    m = torch.ones(4, 5, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match=r"old_logprobs' device") as info:
        lk.lens_advantages(torch.zeros(4, 5), m, torch.zeros(4), group_size=2)
    assert "logits" not in str(info.value)


def _meta(value):
    return value.to("meta") if isinstance(value, torch.Tensor) else value


DEVICE_CALLS = {  # function: (call, its tensor arguments in order; the first sets the device)
    "fused_lens_loss": (lambda L, y, m, r: lk.fused_lens_loss(L, y, m, r, group_size=2), "logits the logits'"),
    "fused_lens_loss triton": (lambda L, y, m, r: lk.fused_lens_loss(L, y, m, r, group_size=2, backend="triton"),
                               "logits the logits'"),  # said "backend: 'triton' is not available ... on meta"
    "reference.fused_lens_loss": (lambda L, y, m, r: lk.reference.fused_lens_loss(L, y, m, r, group_size=2),
                                  "logits the logits'"),
    "token_logprobs": (lambda L, y, m, r: lk.token_logprobs(L, y), "logits the logits'"),
    "fused_linear_lens_loss": (lambda H, y, m, r, W: lk.fused_linear_lens_loss(H, W, y, m, r, group_size=2),
                               "hidden hidden's"),
    "fused_linear_token_logprobs": (lambda H, y, m, r, W: lk.fused_linear_token_logprobs(H, W, y), "hidden hidden's"),
    "lens_advantages": (lambda O, y, m, r: lk.lens_advantages(O, m, r, group_size=2), "old_logprobs old_logprobs'"),
    "lens_advantages_from_stats": (lambda S, y, m, r: lk.lens_advantages_from_stats(S, m.sum(-1), r, group_size=2),
                                   "logp_sum logp_sum's"),
}


@pytest.mark.parametrize("function", list(DEVICE_CALLS))
@pytest.mark.parametrize("on_meta", ["first", "second"])
def test_device_mismatch_names_the_tensor_on_the_wrong_device(function, on_meta):
    """Issue 20 item 4: logits on ``meta`` beside CPU tensors named the mask (torch) or the
    backend (triton); now the first argument is named when it is the odd one, else the other."""
    call, names = DEVICE_CALLS[function]
    first, whose = names.split(" ", 1)
    L, y, m, r = (t.cpu() for t in _batch())
    lead = {"logits": L, "hidden": L[..., :8], "old_logprobs": L[..., 0], "logp_sum": L[:, 0, 0]}[first]
    extra = [torch.randn(50, 8)] if first == "hidden" else []
    args = [lead, y, m, r, *extra]
    if on_meta == "first":
        args[0] = _meta(args[0])
        message = f"{first}: expected a tensor on cpu (the other tensors' device), got meta"
    else:  # the second tensor the function reads
        second = {"old_logprobs": 2, "logp_sum": 2}.get(first, 1)
        args[second] = _meta(args[second])
        name = {"old_logprobs": "completion_mask", "logp_sum": "n_tokens"}.get(first, "target_ids")
        message = f"{name}: expected a tensor on cpu ({whose} device), got meta"
    with pytest.raises(ValueError) as info:
        call(*args)
    assert str(info.value) == message


def test_lens_advantages_shape_names_its_argument():
    with pytest.raises(ValueError, match=r"completion_mask: expected shape") as info:
        lk.lens_advantages(torch.zeros(4, 5), torch.ones(4, 6, dtype=torch.bool), torch.zeros(4), group_size=2)
    assert "logits" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors only")
def test_cuda_backend_on_cpu_says_whether_built():
    L, y, m, r = _batch()
    with pytest.raises(ValueError, match=r"backend: 'cuda' is not available.*the CUDA library (is built|is not usable)"):
        lk.fused_lens_loss(L, y, m, r, group_size=2, backend="cuda")


def test_no_grad_logits_warn_once(monkeypatch):
    monkeypatch.setattr(api, "_WARNED_NO_GRAD", False)
    L, y, m, r = _batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lk.fused_lens_loss(L, y, m, r, group_size=2)
        lk.fused_lens_loss(L, y, m, r, group_size=2)
        lk.fused_lens_loss(L.requires_grad_(), y, m, r, group_size=2)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "do not require grad" in messages[0]
    assert "not require grad" in lk.fused_lens_loss.__doc__


# ---------------------------------------------------------------- item 6
@pytest.mark.parametrize("value", [NAN, -INF])
@pytest.mark.parametrize("on_policy", [True, False])
def test_reference_gradient_finite_at_masked_out_rows(value, on_policy):
    L, y, m, r = _batch()
    L[1, 2] = value
    m[1, 2] = False
    kw = {} if on_policy else {"old_logprobs": _logp(-3.0)}
    out, grad = _run(lk.reference.fused_lens_loss, L, y, m, r, group_size=2, **kw)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert (grad[1, 2] == 0).all()
    for backend in BACKENDS:
        fused, fused_grad = _run(lk.fused_lens_loss, L, y, m, r, group_size=2, backend=backend, **kw)
        assert _same(fused.loss, out.loss) and _same(fused_grad, grad)
