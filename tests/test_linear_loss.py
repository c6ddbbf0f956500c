"""``fused_linear_lens_loss`` against ``lk.reference.fused_lens_loss`` applied to the
materialised logits ``hidden @ weight.T + bias`` in float64: the loss, every output field,
``dh``, ``dW`` and ``dbias``.  Triton runs through the interpreter on the CPU, so shapes are
tiny (and not multiples of any block)."""
from __future__ import annotations

import pytest
import torch

import lens_kernels as lk
from lens_kernels.linear_api import fused_linear_lens_loss
from lens_kernels.testing import group_rewards

from .conftest import DEVICE, interpreting, runnable_backends
from .tolerances import check

# "triton": gemm="auto" (one pass with cuBLAS where it applies, Triton tiles otherwise);
# "triton-library": cuBLAS row blocks for both paths; "triton-gemm": gemm="triton" (one pass with
# the Triton block GEMMs that skip rows where it applies, Triton tiles otherwise).
BACKENDS = [b for b in runnable_backends() if b != "cuda"]
BACKENDS += ["triton-library", "triton-gemm"] if "triton" in BACKENDS else []
GEMMS = {"triton-library": "library", "triton-gemm": "triton"}
FIELDS = ("logprobs", "advantages", "calibrated_rewards", "confidence", "difficulty",
          "negative_group_fraction", "clip_fraction", "kl")


def make_linear_problem(batch=8, length=5, dim=24, vocab=203, group_size=4, *, bias=True, temperature=1.0,
                        empty_rows=0, off_policy=0.0, with_ref=False, seed=0, dtype=torch.float32):
    """``(hidden, weight, bias, kwargs)``: targets sampled from the policy itself (so that
    confidences are not all tiny), a prompt prefix and a random end per row, rewards cycling
    through negative, mixed and all-correct groups; ``target_ids`` is -100 where masked out."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) * (2.5 / dim**0.5)
    b = torch.randn(vocab, generator=gen) if bias else None
    logits = hidden.double() @ weight.double().T + (0 if b is None else b.double())
    probs = torch.softmax(logits.view(-1, vocab) / temperature, -1)
    targets = torch.multinomial(probs, 1, generator=gen).view(batch, length)
    positions = torch.arange(length)
    start = torch.randint(0, 2, (batch, 1), generator=gen)
    end = torch.randint(length // 2 + 1, length + 1, (batch, 1), generator=gen)
    mask = (positions >= start) & (positions < end)
    mask[:empty_rows] = False
    logp = lk.reference.token_logprobs(logits, targets, temperature)
    kwargs = dict(target_ids=torch.where(mask, targets, -100), completion_mask=mask,
                  rewards=group_rewards(batch // group_size, group_size, gen), group_size=group_size,
                  temperature=temperature)
    if off_policy:
        kwargs["old_logprobs"] = (logp + off_policy * torch.randn(logp.shape, generator=gen, dtype=logp.dtype)).clamp(max=0.0).float()
    if with_ref:
        kwargs["ref_logprobs"] = (logp + 0.3 * torch.randn(logp.shape, generator=gen, dtype=logp.dtype)).clamp(max=0.0).float()
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return cast(hidden), cast(weight), cast(b), kwargs


def run(fn, hidden, weight, bias, kwargs):
    leaves = [None if t is None else t.detach().requires_grad_() for t in (hidden, weight, bias)]
    out = fn(*leaves, kwargs)
    grads = torch.autograd.grad(out.loss, [t for t in leaves if t is not None])
    return out, grads


def fused(backend, options):
    backend, gemm = ("triton", GEMMS[backend]) if backend in GEMMS else (backend, "auto")
    return lambda h, w, b, kw: fused_linear_lens_loss(h, w, bias=b, **kw, **options, backend=backend, gemm=gemm)


def materialised(options, compute_dtype=torch.float64):
    def loss(h, w, b, kw):
        logits = h.to(compute_dtype) @ w.to(compute_dtype).T
        logits = logits if b is None else logits + b.to(compute_dtype)
        ids = torch.where(kw["completion_mask"], kw["target_ids"], 0)
        return lk.reference.fused_lens_loss(logits, **{**kw, "target_ids": ids}, **options, compute_dtype=compute_dtype)
    return loss


def compare(backend, problem, options, ulp_slack=0.0):
    hidden, weight, bias, kwargs = problem
    dtype = hidden.dtype
    out, grads = run(fused(backend, options), *problem)
    gold, gold_grads = run(materialised(options), *problem)
    native, native_grads = (None, [None] * 3)
    if dtype != torch.float32:
        native, native_grads = run(materialised(options, dtype), *problem)
    check("loss", out.loss, gold.loss, native and native.loss, dtype)
    for name, value, expected, own in zip(("dh", "dW", "dbias"), grads, gold_grads, native_grads):
        assert value.dtype == dtype, name
        check(name, value, expected, own, dtype, ulp_slack)
    for field in FIELDS:
        value, expected = getattr(out, field), getattr(gold, field)
        if expected is None:
            assert value is None, f"{field}: expected None"
            continue
        if field == "logprobs":
            value, expected = value * kwargs["completion_mask"], expected * kwargs["completion_mask"]
        check(field, value, expected, native and getattr(native, field), dtype)
    return out


# id -> (make_linear_problem options, loss options); shapes differ so that no block divides them.
CASES = {
    "lens-bias-tau0.8": (dict(temperature=0.8), {}),
    "grpo-no-bias": (dict(bias=False, dim=37, vocab=131), dict(mode="grpo")),
    "off-policy-dual-clip-kl": (dict(off_policy=0.6, with_ref=True), dict(clip_ratio_c=1.5, beta=0.1)),
    "empty-rows-token-mean": (dict(empty_rows=3, length=7), dict(loss_agg_mode="token-mean")),
    "advantages-given": (dict(), dict(advantages=torch.tensor([0.5, -1.0, 0.0, 2.0, 0.0, 0.0, -0.3, 0.7]),
                                      group_size=None)),
}
INTERPRETED = ("lens-bias-tau0.8", "off-policy-dual-clip-kl", "advantages-given")


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_against_reference_on_materialised_logits(backend, case):
    if backend.startswith("triton") and interpreting() and case not in INTERPRETED:
        pytest.skip("Triton interpreter: a few cases on the CPU, all on a GPU")
    problem_options, options = CASES[case]
    hidden, weight, bias, kwargs = make_linear_problem(**problem_options)
    if "advantages" in options:
        options = {**options, "advantages": options["advantages"].to(DEVICE)}
        kwargs.pop("group_size")
        options.pop("group_size")
    out = compare(backend, (hidden, weight, bias, kwargs), options)
    if case.startswith("off-policy"):
        assert out.clip_fraction > 0, "the case was meant to make clipping active"


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter: 1 / tiny -> inf
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_no_worse_than_pytorch(backend):
    slack = 1.0 if backend.startswith("triton") and interpreting() else 0.0  # the interpreter truncates to bf16
    compare(backend, make_linear_problem(dtype=torch.bfloat16, empty_rows=1), dict(mode="grpo"), ulp_slack=slack)


def test_all_rows_empty_gives_zero_loss_and_gradients():
    hidden, weight, bias, kwargs = make_linear_problem(empty_rows=8)
    out, grads = run(fused("torch", {}), hidden, weight, bias, kwargs)
    assert out.loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_tied_embeddings_accumulate_into_the_shared_weight():
    """A tiny tied LM (embedding -> tanh -> the embedding matrix as lm_head): the shared
    weight's gradient equals the materialised model's, input and output sides together."""
    hidden, weight, _, kwargs = make_linear_problem(bias=False, vocab=61)
    inputs = torch.where(kwargs["completion_mask"], kwargs["target_ids"], 0).roll(1, 1)
    grads = []
    for loss, dtype in ((fused("torch", {}), torch.float32), (materialised({}), torch.float64)):
        shared = weight.detach().to(dtype).requires_grad_()
        states = torch.tanh(torch.nn.functional.embedding(inputs, shared))
        (grad,) = torch.autograd.grad(loss(states, shared, None, kwargs).loss, shared)
        grads.append(grad)
    check("tied dW", grads[0], grads[1], None, torch.float32)


def test_masked_positions_may_hold_any_id_and_checks_name_hidden():
    hidden, weight, bias, kwargs = make_linear_problem()
    out = fused_linear_lens_loss(hidden, weight, bias=bias, **kwargs, backend="torch")
    assert torch.equal(out.logprobs[~kwargs["completion_mask"]], torch.zeros_like(out.logprobs[~kwargs["completion_mask"]]))
    bad = hidden.clone()
    bad[1, 2] = float("nan")
    kwargs["completion_mask"][1, 2] = True
    kwargs["target_ids"][1, 2] = 0
    with pytest.raises(ValueError, match="hidden/weight: expected finite values"):
        fused_linear_lens_loss(bad, weight, bias=bias, **kwargs, backend="torch")
    with pytest.raises(ValueError, match="weight: expected shape"):
        fused_linear_lens_loss(hidden, weight.T, bias=bias, **kwargs, backend="torch")
