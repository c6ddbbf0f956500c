"""Issue 20, items 2 and 3: extreme inputs the checks let through, and inputs they reject when
``check_values=False``, give one outcome on every backend: ``lk.reference``'s.

Outcomes (documented in ``lk.fused_lens_loss``'s docstring):

- a clipped token whose ratio overflows (``old_logprobs`` -1000 or -1e30), a zero advantage
  times an overflowing ratio, the dual-clip cap, huge advantages (1e30), ``ref_logprobs`` of
  -1e30: finite loss and gradient; a flat token contributes exactly 0 to the gradient;
- ``ref_logprobs`` so large that ``exp(ref - logp)`` overflows (1e30, allowed by the checks
  only with ``check_values=False``): ``kl`` and, with ``beta > 0``, the loss are +inf;
- a target id outside ``[0, V)`` at a masked position: that token's log-prob is NaN, so the
  loss is NaN (on-policy also its group's advantages); never a finite, wrong loss;
- a NaN (or +inf) reward / old log-prob: NaN for its group (the group counts as mixed);
  rewards outside ``[0, 1]`` and old log-probs above 0 are used as given by the formulas;
- mask values other than 0/1 (2, 0.5, -1, NaN): any nonzero value is a completion token;
- a group of one row (``group_index``): advantage NaN when mixed (its std is 0 / 0), 0 when
  negative (LENS de-means negative groups without dividing by the std);
- a NaN advantage (``advantages`` given): NaN loss.

``logprobs`` is 0 at masked-out positions on every backend (and the reference).
"""
from __future__ import annotations

import pytest
import torch

import lens_kernels as lk
from lens_kernels import validation
from lens_kernels.backends import cuda as cuda_backend
from lens_kernels.backends.cuda import library

from .conftest import DEVICE
from .kernel_backends import KERNEL_BACKENDS, use_backend

NAN, INF = float("nan"), float("inf")
FIELDS = ("loss", "logprobs", "advantages", "calibrated_rewards", "confidence", "difficulty",
          "negative_group_fraction", "clip_fraction", "kl")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request, monkeypatch):
    """Every backend through the public API: cuda on a GPU, or csrc/ emulated on the CPU (the
    library then reported available for CPU tensors, options validated afresh)."""
    use_backend(request.param, monkeypatch)
    if request.param == "cuda" and DEVICE == "cpu":
        monkeypatch.setattr(cuda_backend, "is_available", lambda device=None: True)
        monkeypatch.setattr(validation, "_OPTIONS", {}, raising=False)  # no cached cuda-on-cpu options
    yield request.param
    library.load.cache_clear()


def _run(fn, logits, targets, mask, rewards, kwargs, **extra):
    x = logits.clone().to(DEVICE).requires_grad_()
    moved = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    out = fn(x, targets.to(DEVICE), mask.to(DEVICE), rewards.to(DEVICE), **moved, **extra)
    (grad,) = torch.autograd.grad(out.loss, x)
    return out, grad


def _agree(name: str, value, gold) -> None:
    """NaN exactly where the reference has NaN, the same infinities, finite values within 1e-5
    relative to the largest finite reference value (fp32 logits against float64)."""
    if gold is None:
        assert value is None, f"{name}: expected None"
        return
    value, gold = value.detach().double().cpu(), gold.detach().double().cpu()
    assert torch.equal(value.isnan(), gold.isnan()), f"{name}: NaN at {value.isnan()} vs reference {gold.isnan()}"
    infinite = gold.isinf()
    assert torch.equal(value[infinite], gold[infinite]) and not value[~infinite].isinf().any(), (name, value, gold)
    finite = torch.isfinite(gold)
    scale = max(float(gold[finite].abs().max()), 1e-6) if finite.any() else 1.0
    error = float((value[finite] - gold[finite]).abs().max()) if finite.any() else 0.0
    assert error <= 1e-5 * scale, (name, error, value, gold)


def _compare(backend, logits, targets, mask, rewards, kwargs, grad_rows_only=False):
    gold, gold_grad = _run(lk.reference.fused_lens_loss, logits, targets, mask, rewards, kwargs, check_values=False)
    out, grad = _run(lk.fused_lens_loss, logits, targets, mask, rewards, kwargs, check_values=False,
                     backend=backend)
    for field in FIELDS:
        _agree(field, getattr(out, field), getattr(gold, field))
    if grad_rows_only:  # an infinite d loss / d logp: which entries are inf or NaN is arithmetic
        assert torch.equal(torch.isfinite(grad).all(-1).cpu(), torch.isfinite(gold_grad).all(-1))
    else:
        _agree("grad", grad, gold_grad)
    return out, grad


# ------------------------------------------------------------------ item 2: no overflow in the surrogate
def _repro():
    """Issue 20's repro: B=4, T=3, V=11, every token in the mask, rewards [1, 0, 0, 0]."""
    gen = torch.Generator().manual_seed(20)
    logits = torch.randn(4, 3, 11, generator=gen)
    targets = torch.randint(0, 11, (4, 3), generator=gen)
    old = -0.5 - torch.rand(4, 3, generator=gen)
    return logits, targets, torch.ones(4, 3, dtype=torch.bool), torch.tensor([1.0, 0, 0, 0]), old


def _old_row0(value, rewards=None, **options):
    def make():
        logits, targets, mask, r, old = _repro()
        old[0] = value
        return logits, targets, mask, r if rewards is None else torch.tensor(rewards), \
            dict(group_size=2, old_logprobs=old, **options)
    return make


def _huge_advantages():
    logits, targets, mask, r, old = _repro()
    old[0] = -1e30
    return logits, targets, mask, r, dict(old_logprobs=old, advantages=torch.tensor([1e30, -1e30, 1e30, 0.0]))


def _ref_row0(value):
    def make():
        logits, targets, mask, r, old = _repro()
        ref = old.clone()
        ref[0] = value
        return logits, targets, mask, r, dict(group_size=2, old_logprobs=old, ref_logprobs=ref, beta=0.1)
    return make


FLAT_ROW0 = {  # row 0's tokens are flat in the ratio: exactly 0 gradient
    "old -1000, clipped": _old_row0(-1000.0),
    "old -1e30, clipped": _old_row0(-1e30),
    "old -1e30, dual-clip cap": _old_row0(-1e30, rewards=[0.0, 1, 0, 0], clip_ratio_c=3.0),
    "old -1e30, zero advantage": _old_row0(-1e30, rewards=[0.0, 0, 1, 0], mode="lens-mixed-only"),
    "huge advantages": _huge_advantages,
}
OVERFLOW = {
    "ref -1e30": _ref_row0(-1e30),
    **FLAT_ROW0,
}


@pytest.mark.parametrize("case", list(OVERFLOW))
def test_overflowing_ratio_gives_finite_gradient(backend, case):
    """Item 2: finite loss and gradient, as the reference's, on every backend (the reference
    and the torch backend gave 33 NaN gradient entries in row 0 at old = -1000)."""
    out, grad = _compare(backend, *OVERFLOW[case]())
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all(), (out.loss, grad)
    if case in FLAT_ROW0:
        assert torch.equal(grad[0], torch.zeros_like(grad[0])), grad[0]
    assert grad.abs().sum() > 0  # the other rows still learn


def test_surrogate_gradient_unchanged_for_ordinary_inputs():
    """The reference's token objective against the plain formulas, gradient included, on
    ratios inside and outside the clip range, ties at the bounds and both signs of A."""
    from lens_kernels.config import LensOptions

    logp = torch.tensor([[-1.0, -2.0, -0.5, -1.0 + torch.log(torch.tensor(1.2)).item(), -3.0]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -1.5, -1.0, -1.0, -2.9]], dtype=torch.float64)
    for adv in (0.7, -0.7):
        for c in (None, 1.5):
            options = LensOptions(clip_ratio_c=c, eps_high=0.2, eps_low=0.2)
            x = logp.clone().requires_grad_()
            loss, clipped, _ = lk.reference.token_objective(x, old, torch.tensor([adv], dtype=torch.float64), options)
            (grad,) = torch.autograd.grad(loss.sum(), x)
            y = logp.clone().requires_grad_()
            a = torch.tensor([[adv]], dtype=torch.float64)
            ratio = torch.exp(y - old)
            plain = -torch.minimum(a * ratio, a * ratio.clamp(0.8, 1.2))
            if c is not None and adv < 0:
                plain = torch.minimum(plain, -a * c)
            (plain_grad,) = torch.autograd.grad(plain.sum(), y)
            assert torch.equal(loss, plain.detach()) and torch.equal(grad, plain_grad), (adv, c, grad, plain_grad)
            assert torch.equal(clipped, (-a * ratio.clamp(0.8, 1.2) > -a * ratio).detach())


def test_ref_so_large_that_k3_overflows_gives_inf(backend):
    """``ref_logprobs`` = 1e30 (rejected by the checks: above 0): kl and the loss are +inf, on
    every backend; the gradient is non-finite in that token's row only."""
    out, grad = _compare(backend, *_ref_row0(1e30)(), grad_rows_only=True)
    assert out.loss.item() == INF and out.kl.item() == INF
    assert (~torch.isfinite(grad).all(-1)).sum() == 3  # row 0's three tokens


# ------------------------------------------------------------------ item 3: checks off, one outcome
def _batch():
    """B=4, T=5, V=37, groups of 2, rewards [1, 0, 0, 0]; -100 labels at masked-out positions."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 5, 37, generator=gen) * 2
    mask = torch.ones(4, 5)
    mask[1, 4] = 0
    mask[3, 3:] = 0
    targets = torch.where(mask.bool(), torch.randint(0, 37, (4, 5), generator=gen), -100)
    old = -0.5 - torch.rand(4, 5, generator=gen) * 2
    return logits, targets, mask, torch.tensor([1.0, 0, 0, 0]), old


def _unchecked(edit):
    def make():
        logits, targets, mask, rewards, old = _batch()
        kwargs = dict(group_size=2, old_logprobs=old)
        edit(logits, targets, mask, rewards, kwargs)
        return logits, targets, mask, rewards, kwargs
    return make


def _set(name, index, value):
    def edit(logits, targets, mask, rewards, kwargs):
        tensor = {"targets": targets, "mask": mask, "rewards": rewards, "old": kwargs.get("old_logprobs")}[name]
        tensor[index] = value
    return edit


def _on_policy(edit):
    def both(logits, targets, mask, rewards, kwargs):
        edit(logits, targets, mask, rewards, kwargs)
        kwargs.pop("old_logprobs")
    return both


def _groups_of_one(logits, targets, mask, rewards, kwargs):
    """Rows 2 (reward 1: a mixed group) and 3 (reward 0: negative) alone in their groups."""
    kwargs.pop("group_size")
    kwargs["group_index"] = torch.tensor([0, 0, 1, 2])
    rewards[2] = 1.0


def _nan_advantage(logits, targets, mask, rewards, kwargs):
    kwargs.pop("group_size")
    kwargs["advantages"] = torch.tensor([1.0, NAN, 0.5, -0.5])


def _nan_groups(first: bool, second: bool):
    """Advantages NaN exactly in group 0 (rows 0, 1) and/or group 1 (rows 2, 3)."""
    return lambda out: out.advantages.isnan().tolist() == [first] * 2 + [second] * 2


_finite = lambda out: bool(torch.isfinite(out.loss))  # noqa: E731
_live = lambda out: bool(torch.isfinite(out.loss)) and out.logprobs[0, 2].item() != 0  # noqa: E731

UNCHECKED = {  # case: (edit, the documented outcome every backend gives)
    "id V at a masked position": (_set("targets", (0, 0), 37), lambda out: bool(out.logprobs[0, 0].isnan())),
    "id -100 at a masked position": (_set("targets", (0, 1), -100), lambda out: bool(out.logprobs[0, 1].isnan())),
    "id V, on-policy": (_on_policy(_set("targets", (0, 0), 37)), _nan_groups(True, False)),
    "reward 2": (_set("rewards", 0, 2.0), _finite),  # as -0.5: outside [0, 1], used as given
    "reward NaN": (_set("rewards", 2, NAN), lambda out: _nan_groups(False, True)(out)
                   and out.negative_group_fraction.item() == 0),  # group 1 counts as mixed
    "old NaN": (_set("old", (2, 1), NAN), _nan_groups(False, True)),
    "old +inf": (_set("old", (2, 1), INF), _nan_groups(False, True)),
    "old +5": (_set("old", (2, 1), 5.0), _finite),
    "mask 2": (_set("mask", (0, 2), 2.0), _live),  # as 0.5 or -1: nonzero
    "mask NaN": (_set("mask", (0, 2), NAN), _live),
    "groups of one row": (_groups_of_one, lambda out: out.advantages[2].isnan() and out.advantages[3].item() == 0),
    "NaN advantage": (_nan_advantage, lambda out: bool(out.loss.isnan())),
}


@pytest.mark.parametrize("case", list(UNCHECKED))
def test_unchecked_inputs_agree_with_reference(backend, case):
    """Item 3: every output, and the gradient, equal to the reference's (NaN at the same
    places) with ``check_values=False``; masked-out log-probs are 0."""
    edit, outcome = UNCHECKED[case]
    logits, targets, mask, rewards, kwargs = _unchecked(edit)()
    out, _ = _compare(backend, logits, targets, mask, rewards, kwargs)
    assert torch.equal(out.logprobs[~mask.bool().to(DEVICE)].cpu(), torch.zeros(int((~mask.bool()).sum())))
    assert outcome(out), (out.loss, out.advantages, out.logprobs)
    if case.startswith("id"):
        assert out.loss.isnan() and out.logprobs[0].isnan().sum() == 1
        with pytest.raises(ValueError, match="^target_ids: expected ids in"):
            lk.fused_lens_loss(logits.to(DEVICE), targets.to(DEVICE), mask.to(DEVICE), rewards.to(DEVICE),
                               backend=backend, **{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
                                                   for k, v in kwargs.items()})


@pytest.mark.parametrize("ids", ["V", "-100"])
def test_token_logprobs_out_of_range_id_is_nan(backend, ids):
    """``token_logprobs(check_values=False)``: NaN at an id outside ``[0, V)``, the gradient
    without its one-hot term (``-g p``), on every backend."""
    logits, targets, _, _, _ = _batch()
    targets = targets.clamp(min=0)  # no mask here: every id is read
    targets[2, 3] = 37 if ids == "V" else -100
    x = logits.to(DEVICE).requires_grad_()
    logp = lk.token_logprobs(x, targets.to(DEVICE), backend=backend, check_values=False)
    g = torch.linspace(-1, 1, 20).view(4, 5).to(DEVICE)
    (grad,) = torch.autograd.grad(logp, x, g)
    y = logits.double().requires_grad_()
    gold = lk.reference.token_logprobs(y, targets)
    (gold_grad,) = torch.autograd.grad(gold, y, g.double().cpu())
    _agree("logp", logp, gold)
    _agree("grad", grad, gold_grad)
    assert logp.isnan().sum() == 1 and logp[2, 3].isnan()
    expected = -g[2, 3].cpu().double() * torch.softmax(logits[2, 3].double(), -1)
    assert torch.allclose(gold_grad[2, 3], expected)


@pytest.mark.parametrize("gemm", ["triton", "library"])
@pytest.mark.parametrize("policy", ["off-policy", "on-policy"])
def test_fused_linear_out_of_range_id_is_nan(backend, gemm, policy):
    """The fused-linear paths (torch; Triton tiles, Triton block GEMMs and cuBLAS row blocks;
    cuda row blocks) give what the reference gives on ``hidden @ weight.T`` for an id outside
    ``[0, V)`` at a masked position with the checks off: a NaN log-prob there, NaN loss."""
    if gemm == "triton" and backend != "triton":
        pytest.skip("gemm='triton' is a Triton path")
    logits, targets, mask, rewards, old = _batch()
    targets[0, 0] = 37
    gen = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(4, 5, 16, generator=gen), torch.randn(37, 16, generator=gen) * 0.3
    kwargs = dict(group_size=2, check_values=False, **({"old_logprobs": old} if policy == "off-policy" else {}))
    h, w = hidden.to(DEVICE).requires_grad_(), weight.to(DEVICE).requires_grad_()
    moved = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    out = lk.fused_linear_lens_loss(h, w, targets.to(DEVICE), mask.to(DEVICE), rewards.to(DEVICE), backend=backend,
                                    gemm=gemm if backend == "triton" else "auto", **moved)
    gold = lk.reference.fused_lens_loss((hidden.double() @ weight.double().T), targets, mask, rewards, **kwargs)
    for field in FIELDS:
        _agree(field, getattr(out, field), getattr(gold, field))
    assert out.loss.isnan() and out.logprobs[0, 0].isnan()
