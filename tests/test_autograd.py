"""Autograd and compiler integration: gradcheck, torch.compile(fullgraph=True), memory bounds."""
from __future__ import annotations

import pytest
import torch

import lens_kernels as lk
from lens_kernels.backends import torch_backend
from lens_kernels.testing import make_problem

from .conftest import DEVICE, runnable_backends
from .tolerances import check


@pytest.mark.parametrize(
    "options",
    [dict(off_policy=0.05), dict(off_policy=0.4, mode="grpo"), dict(off_policy=0.1, with_ref=True, beta=0.2, temperature=0.8)],
    ids=["lens", "grpo-clipping", "kl-temperature"],
)
def test_gradcheck_float64_torch_backend(options):
    """Old log-probs are passed explicitly: on-policy, ``old = logp.detach()`` moves with the
    finite-difference probe, which a derivative with detached ``old`` does not see."""
    problem_keys = {"off_policy", "with_ref", "temperature"}
    problem = make_problem(batch=4, length=3, vocab=7, group_size=2, logit_scale=1.0,
                           **{k: v for k, v in options.items() if k in problem_keys})
    loss_options = {k: v for k, v in options.items() if k not in problem_keys}
    logits = problem.pop("logits").double().detach().requires_grad_()
    problem = {k: (v.double() if k.endswith("logprobs") else v) for k, v in problem.items()}

    def loss(x):
        return lk.fused_lens_loss(x, **problem, **loss_options, backend="torch").loss

    assert torch.autograd.gradcheck(loss, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_token_logprobs():
    logits = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (2, 3))
    assert torch.autograd.gradcheck(
        lambda x: lk.token_logprobs(x, targets, temperature=1.3, backend="torch"), (logits,)
    )


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", ["auto"] + runnable_backends())
def test_training_step_compiles_with_fullgraph(backend, compiler):
    """The loss of a step calling fused_lens_loss compiles without graph breaks (forward and
    AOT-traced backward) and matches eager."""
    torch._dynamo.reset()
    problem = make_problem(batch=4, length=6, vocab=50, group_size=2, off_policy=0.3, device=DEVICE)
    hidden = torch.randn(4, 6, 16, device=DEVICE)
    head = torch.nn.Linear(16, 50).to(DEVICE)
    logits_args = {k: v for k, v in problem.items() if k != "logits"}

    def step(h):
        out = lk.fused_lens_loss(head(h), **logits_args, backend=backend)
        return out.loss, out.advantages, out.clip_fraction

    def run(fn):
        head.weight.grad = None
        loss, *metrics = fn(hidden)
        loss.backward()
        return [loss.detach(), *metrics, head.weight.grad.clone()]

    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True, backend=compiler))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_torch_backend_chunking_is_invisible(monkeypatch):
    """Tiny chunks (one row, or one position, at a time) give the same results."""
    problem = make_problem(batch=4, length=5, vocab=1000, group_size=2, off_policy=0.3)
    logits = problem.pop("logits").detach().requires_grad_()
    full = lk.fused_lens_loss(logits, **problem, backend="torch")
    (full_grad,) = torch.autograd.grad(full.loss, logits)
    for rows in (5, 2):  # whole-batch rows of T positions, then 2 positions at a time
        monkeypatch.setattr(torch_backend, "CHUNK_BYTES", 12 * 1000 * rows)
        out = lk.fused_lens_loss(logits, **problem, backend="torch")
        (grad,) = torch.autograd.grad(out.loss, logits)
        torch.testing.assert_close(out.loss, full.loss, rtol=0, atol=1e-7)
        torch.testing.assert_close(grad, full_grad, rtol=0, atol=1e-9)


def test_torch_backend_temporaries_are_bounded():
    """The chunk size keeps the fp32 temporaries under CHUNK_BYTES for any V."""
    for vocab in (1000, 50257, 151936):
        for batch, length in ((1, 65536), (64, 512), (3, 7)):
            for rows, cols in torch_backend._chunks(batch, length, vocab):
                count = len(range(batch)[rows]) * len(range(length)[cols])
                assert 12 * vocab * count <= max(torch_backend.CHUNK_BYTES, 12 * vocab)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in runnable_backends() if b != "torch"] or ["none"])
@pytest.mark.parametrize(
    "shape", [(8, 4, 151936), (2, 65536, 128), (2, 8192, 131072)], ids=["V151936", "T65536", "BTV-2^31"]
)
def test_large_shapes_on_gpu(backend, shape):
    """Large V, T = 65536 in one row, and B*T*V >= 2**31 (64-bit offsets), bf16."""
    if backend == "none":
        pytest.skip("no GPU backend available")
    batch, length, vocab = shape
    torch.manual_seed(0)
    logits = torch.randn(batch, length, vocab, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (batch, length), device=DEVICE)
    mask = torch.ones(batch, length, dtype=torch.bool, device=DEVICE)
    mask[:, : length // 4] = False
    rewards = torch.zeros(batch, device=DEVICE)
    rewards[0] = 1.0
    kwargs = dict(target_ids=targets, completion_mask=mask, rewards=rewards, group_size=batch)
    out = lk.fused_lens_loss(logits, **kwargs, backend=backend)
    (grad,) = torch.autograd.grad(out.loss, logits)
    ref = lk.fused_lens_loss(logits, **kwargs, backend="torch")
    (ref_grad,) = torch.autograd.grad(ref.loss, logits)
    check("logprobs", out.logprobs, ref.logprobs, ref.logprobs, torch.float32)
    assert (grad.float() - ref_grad.float()).abs().max() <= 2 * ref_grad.float().abs().max() * 2**-8


@gpu
@pytest.mark.gpu
def test_token_logprobs_single_row_of_65536_positions():
    for backend in runnable_backends():
        logits = torch.randn(1, 65536, 1000, device=DEVICE, dtype=torch.bfloat16)
        targets = torch.randint(0, 1000, (1, 65536), device=DEVICE)
        got = lk.token_logprobs(logits, targets, backend=backend)
        gold = lk.reference.token_logprobs(logits, targets, compute_dtype=torch.float32)
        torch.testing.assert_close(got, gold.float(), rtol=1e-5, atol=1e-5)
