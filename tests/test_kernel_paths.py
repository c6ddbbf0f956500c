"""The one-pass and two-pass loss paths of the GPU backends (``backends.kernel_loss``) against
the float64 reference, for every kernel backend that runs here: triton (on a GPU or through the
interpreter) and cuda (on a GPU, or csrc/ emulated on the CPU).  The public-API contract suite
is test_parity.py; this one pins the paths themselves: both agree with the reference and with
each other, masked-out rows are never read, and the backward's grad_output scaling."""
from __future__ import annotations

import pytest
import torch

import lens_kernels as lk
from lens_kernels.backends import kernel_loss
from lens_kernels.backends.cuda import library
from lens_kernels.config import LensOptions
from lens_kernels.groups import contiguous_groups
from lens_kernels.ops import _logprobs_grad, scale_rows_op
from lens_kernels.testing import make_problem

from .conftest import DEVICE, interpreting
from .test_cuda_backend import build_emulated_library, require_gpu_library
from .tolerances import check

PATHS = ("one-pass", "one-pass-inplace", "two-pass")
MODES = ("lens", "grpo")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    return build_emulated_library(tmp_path_factory.mktemp("csrc_paths"))


@pytest.fixture(params=["triton", "cuda"])
def backend(request, monkeypatch):
    """``(backend name, device)``; cuda runs the built library on a GPU, else the emulation."""
    library.load.cache_clear()
    if request.param == "triton":
        if DEVICE == "cpu" and not interpreting():
            pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    elif DEVICE == "cuda":
        require_gpu_library()
    else:
        monkeypatch.setenv(library.LIBRARY_ENV, str(request.getfixturevalue("emulated")))
        monkeypatch.setenv("LK_EMU_MAX_BLOCKS", "3")
    yield request.param, torch.device(DEVICE)
    library.load.cache_clear()


def _run(path, name, device, problem, options):
    logits = problem["logits"].detach().clone()
    live = problem["completion_mask"]
    groups = contiguous_groups(logits.shape[0], problem["group_size"])
    old = problem.get("old_logprobs") if path != "two-pass" else None
    ref = problem.get("ref_logprobs")
    grad_output = torch.tensor(0.5, device=device)
    if path == "two-pass":
        result = kernel_loss.two_pass(logits, problem["target_ids"], live, problem["rewards"], ref, groups, options)
        grad = _logprobs_grad(result.dlogp, logits, problem["target_ids"], result.lse, options.inv_temperature, name,
                              False, grad_output)
    else:
        grad = logits if path == "one-pass-inplace" else torch.full_like(logits, float("nan"))
        result = kernel_loss.one_pass(logits, problem["target_ids"], live, problem["rewards"], old, ref, None,
                                      groups, options, grad)
        scale_rows_op(grad, grad_output)
    return result, grad / grad_output


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", PATHS)
def test_path_matches_reference(backend, path, mode):
    name, device = backend
    off_policy = 0.0 if path == "two-pass" else 0.5
    problem = make_problem(batch=8, length=5, vocab=203, group_size=4, device=device, off_policy=off_policy,
                           empty_rows=1, with_ref=True, temperature=0.8)
    # Masked-out rows hold NaN and out-of-range ids: neither path may read them.
    mask = problem["completion_mask"]
    problem["logits"] = problem["logits"].masked_fill(~mask.unsqueeze(-1), float("nan"))
    problem["target_ids"] = problem["target_ids"].masked_fill(~mask, -100)
    options = LensOptions(mode=mode, beta=0.1, clip_ratio_c=2.0, temperature=0.8, backend=name)
    result, grad = _run(path, name, device, problem, options)

    leaf = problem["logits"].detach().clone().requires_grad_()
    kwargs = {k: v for k, v in problem.items() if k != "logits"}
    if path == "two-pass":
        kwargs.pop("old_logprobs", None)
    gold = lk.reference.fused_lens_loss(leaf, **kwargs, mode=mode, beta=0.1, clip_ratio_c=2.0)
    (gold_grad,) = torch.autograd.grad(gold.loss, leaf)
    check("loss", result.loss, gold.loss, None, torch.float32)
    check("grad", torch.where(mask.unsqueeze(-1), grad, 0), torch.where(mask.unsqueeze(-1), gold_grad, 0), None,
          torch.float32)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask])), "masked-out rows must get exact zeros"
    check("logprobs", result.logp[mask], gold.logprobs[mask], None, torch.float32)
    assert torch.all(result.logp[~mask] == 0)
    for index, field in enumerate(("advantages", "calibrated_rewards", "confidence", "difficulty",
                                   "negative_group_fraction")):
        check(field, result.calibration[index], getattr(gold, field), None, torch.float32)
    check("clip_fraction", result.clip_fraction, gold.clip_fraction, None, torch.float32)
    check("kl", result.kl, gold.kl, None, torch.float32)
