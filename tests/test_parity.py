"""Every runnable backend against the float64 reference: loss, every output, the gradient."""
from __future__ import annotations

import pytest
import torch

import lens_kernels as lk
from lens_kernels.config import LOSS_AGG_MODES, MODES
from lens_kernels.testing import make_problem

from .conftest import DEVICE, interpreting, runnable_backends
from .tolerances import check

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FIELDS = ("logprobs", "advantages", "calibrated_rewards", "confidence", "difficulty",
          "negative_group_fraction", "clip_fraction", "kl")

# id -> (make_problem options, fused_lens_loss options)
CASES = {
    "basic": ({}, {}),
    "v50257": (dict(batch=4, length=3, vocab=50257, group_size=2), {}),
    "contiguous-logits": (dict(strided=False), {}),
    "empty-rows": (dict(empty_rows=3), {}),
    "temperature-0.7": (dict(temperature=0.7), {}),
    "off-policy-clipping": (dict(off_policy=0.6), {}),
    "asymmetric-clip": (dict(off_policy=0.6), dict(eps_low=0.1, eps_high=0.28)),
    "dual-clip": (dict(off_policy=0.8), dict(clip_ratio_c=1.5)),
    "kl-beta": (dict(with_ref=True, off_policy=0.2), dict(beta=0.1)),
    "kl-metric-only": (dict(with_ref=True), {}),
    "no-std-scaling": ({}, dict(scale_by_std=False)),
    "length-gamma": ({}, dict(length_gamma=0.6)),
    "length-gamma-clamped": (dict(logit_scale=6.0), dict(length_gamma=0.05)),
    "all-negative": (dict(rewards=torch.zeros(8)), {}),
    "all-positive": (dict(rewards=torch.ones(8)), {}),
    "fractional-rewards": (dict(rewards=torch.tensor([0.0, 0.5, 0.25, 1.0, 0.0, 0.0, 0.0, 0.0])), {}),
    "grpo-on-policy": ({}, dict(mode="grpo")),
    "given-advantages": (dict(off_policy=0.3), {}),
    "given-advantages-on-policy": ({}, {}),
    "labels-minus-100": (dict(empty_rows=1), {}),
    "group-index": (
        dict(batch=10, group_size=2),
        dict(group_index=torch.tensor([7, 3, 7, 9, 3, 9, 9, 7, 9, 9]), group_size=None),
    ),
}
GROUP_INDEX_REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0])

# The Triton interpreter is slow: on the CPU it runs the fp32 cases and a few others.
INTERPRETER_CASES = {(c, "fp32") for c in CASES} | {("basic", "bf16"), ("empty-rows", "fp16"), ("v50257", "bf16"),
                                                     ("off-policy-clipping", "bf16")}


def _skip_slow(backend: str, case: str, dtype: str) -> None:
    if backend == "triton" and interpreting() and (case, dtype) not in INTERPRETER_CASES:
        pytest.skip("Triton interpreter: covered on a GPU, thinned on the CPU")


def run_and_compare(backend: str, dtype: torch.dtype, problem: dict, options: dict) -> lk.LensOutput:
    """Run ``backend`` and the reference (float64, and in ``dtype`` for the error budget) on
    the same inputs and check the loss, every output field and the logits' gradient."""
    kwargs = {**problem, **options}
    logits = kwargs.pop("logits").detach().requires_grad_()
    before = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    logits_before = logits.detach().clone()

    def evaluate(fn, **extra):
        out = fn(logits, **kwargs, **extra)
        (grad,) = torch.autograd.grad(out.loss, logits)
        return out, grad

    out, grad = evaluate(lk.fused_lens_loss, backend=backend)
    gold, gold_grad = evaluate(lk.reference.fused_lens_loss)
    native, native_grad = (None, None)
    if dtype != torch.float32:
        native, native_grad = evaluate(lk.reference.fused_lens_loss, compute_dtype=dtype)

    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    check("loss", out.loss, gold.loss, native and native.loss, dtype)
    truncating = backend == "triton" and interpreting() and dtype == torch.bfloat16
    check("grad", grad, gold_grad, native_grad, dtype, ulp_slack=1.0 if truncating else 0.0)
    live = kwargs["completion_mask"].bool()
    if backend != "torch":  # the GPU backends never read masked-out rows: their log-probs are 0
        assert torch.all(out.logprobs[~live] == 0), "logprobs: expected 0 at masked-out positions"
    for field in FIELDS:
        value, expected = getattr(out, field), getattr(gold, field)
        if expected is None:
            assert value is None, f"{field}: expected None"
            continue
        if field == "logprobs":
            value, expected = value[live], expected[live]
            native_value = native and native.logprobs[live]
        else:
            native_value = native and getattr(native, field)
        check(field, value, expected, native_value, dtype)
    assert torch.equal(logits.detach(), logits_before), "logits were modified"
    for key, value in before.items():
        assert torch.equal(kwargs[key], value), f"{key} was modified"
    return out


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", runnable_backends())
def test_case(backend, case, dtype):
    _skip_slow(backend, case, dtype)
    problem_options, options = CASES[case]
    if case == "group-index":
        problem_options = {**problem_options, "rewards": GROUP_INDEX_REWARDS}
        options = {**options, "group_index": options["group_index"].to(DEVICE)}
    problem = make_problem(dtype=DTYPES[dtype], device=DEVICE, **problem_options)
    if case == "group-index":
        problem.pop("group_size")
    if case.startswith("given-advantages"):
        old = problem.get("old_logprobs")
        source = old if old is not None else lk.token_logprobs(problem["logits"], problem["target_ids"])
        given = lk.lens_advantages(source.detach().float(), problem["completion_mask"], problem["rewards"],
                                   group_size=problem.pop("group_size"))
        options = {**options, "advantages": given.advantages}
    if case == "labels-minus-100":
        problem["target_ids"] = problem["target_ids"].masked_fill(~problem["completion_mask"], -100)
    out = run_and_compare(backend, DTYPES[dtype], problem, options)
    if case.startswith("off-policy"):
        assert out.clip_fraction > 0, "the case was meant to make clipping active"


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", runnable_backends())
def test_mode_and_aggregation(backend, mode, agg, dtype):
    if backend == "triton" and interpreting() and (dtype != "fp32" or (MODES.index(mode) + LOSS_AGG_MODES.index(agg)) % 2):
        pytest.skip("Triton interpreter: half the fp32 grid on the CPU, the full grid on a GPU")
    problem = make_problem(batch=8, length=6, vocab=1000, dtype=DTYPES[dtype], device=DEVICE, off_policy=0.3, empty_rows=1)
    run_and_compare(backend, DTYPES[dtype], problem, dict(mode=mode, loss_agg_mode=agg))


@pytest.mark.parametrize("backend", runnable_backends())
def test_inplace_backward_writes_gradient_into_logits(backend):
    problem = make_problem(batch=4, length=5, vocab=1000, group_size=2, device=DEVICE, off_policy=0.3)
    full = problem.pop("logits")
    logits = full.detach().clone().requires_grad_()
    reference_logits = full.detach().clone().requires_grad_()
    gold = lk.reference.fused_lens_loss(reference_logits, **problem)
    (gold_grad,) = torch.autograd.grad(gold.loss, reference_logits)
    storage = logits.detach()
    out = lk.fused_lens_loss(logits, **problem, backend=backend, inplace_backward=True)
    (grad,) = torch.autograd.grad(out.loss, logits)
    assert grad.data_ptr() == storage.data_ptr(), "inplace_backward must reuse the logits' storage"
    check("inplace grad", storage, gold_grad, None, torch.float32)


@pytest.mark.parametrize("backend", runnable_backends())
def test_all_rows_empty_gives_zero_loss_and_gradient(backend):
    problem = make_problem(batch=4, length=5, vocab=37, group_size=2, device=DEVICE, empty_rows=4)
    logits = problem.pop("logits").detach().requires_grad_()
    out = lk.fused_lens_loss(logits, **problem, backend=backend)
    (grad,) = torch.autograd.grad(out.loss, logits)
    assert out.loss.item() == 0.0
    assert torch.count_nonzero(grad) == 0
    assert torch.equal(out.confidence, torch.zeros_like(out.confidence))
