"""GPU-only: the light call of the GPU backends with the value checks off.  A forward+backward
issues at most 6 device operations (kernels, copies, fills), never syncs with the host, is
captured in a CUDA graph and runs under ``torch.compile(mode="reduce-overhead")``."""
from __future__ import annotations

import pytest
import torch

import lens_kernels as lk
from lens_kernels.testing import make_problem

from .conftest import DEVICE

pytestmark = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (CUDA graphs, launch counts)")

BACKENDS = [b for b in ("triton", "cuda") if DEVICE == "cuda" and lk.is_available(b, torch.device("cuda"))]
# id -> (make_problem options, loss options): one-pass (old given / grpo) and two-pass (lens on-policy)
PATHS = {
    "one-pass-off-policy": (dict(off_policy=0.4), {}),
    "one-pass-grpo-on-policy": ({}, dict(mode="grpo")),
    "two-pass-lens-on-policy": ({}, {}),
}


def _problem(options: dict) -> tuple[torch.Tensor, dict]:
    problem = make_problem(batch=16, length=64, vocab=32000, group_size=8, dtype=torch.bfloat16, device="cuda",
                           empty_rows=3, **options)
    logits = problem.pop("logits").detach().contiguous().requires_grad_()
    return logits, problem


def _step(logits, problem, backend, options):
    out = lk.fused_lens_loss(logits, **problem, backend=backend, check_values=False, **options)
    (grad,) = torch.autograd.grad(out.loss, logits)
    return out.loss.detach(), grad  # detached: a kept graph would pin logits' grad node to this stream


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_backward_issues_at_most_six_device_operations_and_no_sync(backend, path):
    problem_options, options = PATHS[path]
    logits, problem = _problem(problem_options)
    _step(logits, problem, backend, options)  # compile and warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            _step(logits, problem, backend, options)
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    device_ops = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert 0 < len(device_ops) <= 6, f"{len(device_ops)} device operations: {device_ops}"


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_backward_replays_in_a_cuda_graph(backend, path):
    problem_options, options = PATHS[path]
    logits, problem = _problem(problem_options)
    eager_loss, eager_grad = _step(logits, problem, backend, options)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _step(logits, problem, backend, options)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, grad = _step(logits, problem, backend, options)
    with torch.no_grad():
        logits.mul_(1.5)
    expected_loss, expected_grad = _step(logits, problem, backend, options)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(loss, expected_loss) and torch.equal(grad, expected_grad)
    assert not torch.equal(grad, eager_grad), "the replay must recompute from the new logits"


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_under_reduce_overhead_compile(backend):
    logits, problem = _problem(dict(off_policy=0.4))
    hidden = torch.randn(16, 64, 256, device="cuda", dtype=torch.bfloat16)
    head = torch.nn.Linear(256, 32000, bias=False, device="cuda", dtype=torch.bfloat16)

    def step():
        out = lk.fused_lens_loss(head(hidden), **problem, backend=backend, check_values=False)
        out.loss.backward()
        return out.loss.detach()

    compiled = torch.compile(step, mode="reduce-overhead")
    losses = []
    for _ in range(3):
        head.weight.grad = None
        losses.append(compiled())
    compiled_grad = head.weight.grad.clone()
    head.weight.grad = None
    eager = step()
    torch.testing.assert_close(losses[-1], eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_grad, head.weight.grad, rtol=2e-2, atol=1e-4)
