"""The fused-linear one-pass path (three GEMMs, gradients made in the forward) against the
recompute path and the float64 reference on materialised logits: several row blocks, NaN
hidden states at masked positions, frozen weights, ``grad_output != 1``, no-grad calls; on
Triton, and on the cuda backend's row kernels (csrc/ on a GPU, or its host emulation)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lens_kernels import linear_api, linear_ops
from lens_kernels.backends import linear_blocks
from lens_kernels.backends.cuda import library
from lens_kernels.config import LensOptions
from lens_kernels.groups import contiguous_groups

from .conftest import DEVICE, runnable_backends
from .test_cuda_backend import build_emulated_library, require_gpu_library
from .test_linear_loss import compare, fused, make_linear_problem, materialised, run
from .tolerances import check

pytestmark = [
    pytest.mark.skipif("triton" not in runnable_backends(), reason="needs Triton (CUDA, or TRITON_INTERPRET=1)"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),  # the interpreter: 1 / tiny -> inf
]

# id -> (make_linear_problem options, loss options): every way into the one-pass path.
ONE_PASS = {
    "grpo-on-policy": (dict(vocab=131, dim=37), dict(mode="grpo")),
    "lens-off-policy-kl": (dict(off_policy=0.5, with_ref=True, temperature=0.7), dict(beta=0.05)),
    "advantages-token-sum": (dict(bias=False), dict(advantages=True, loss_agg_mode="seq-mean-token-sum")),
}


def _problem(case, **extra):
    problem_options, options = ONE_PASS[case]
    hidden, weight, bias, kwargs = make_linear_problem(**{**problem_options, **extra})
    if options.get("advantages"):
        gen = torch.Generator().manual_seed(3)
        options = {**options, "advantages": torch.randn(hidden.shape[0], generator=gen).to(hidden.device)}
        kwargs.pop("group_size")
    return (hidden, weight, bias, kwargs), options


# "triton": the one pass with cuBLAS GEMMs (gemm="auto"); "triton-gemm": with the Triton block GEMMs.
GEMM_VARIANTS = ["triton", "triton-gemm"]


@pytest.mark.parametrize("variant", GEMM_VARIANTS)
@pytest.mark.parametrize("case", list(ONE_PASS))
def test_one_pass_matches_the_reference_over_several_row_blocks(case, variant, monkeypatch):
    """Blocks of 7 rows (40 rows in all, so the last block is short)."""
    problem, options = _problem(case)
    vocab = problem[1].shape[0]
    monkeypatch.setattr(linear_blocks, "SCRATCH_BYTES", 7 * vocab * 4)
    assert linear_blocks.block_rows(40, vocab, 4) == 7
    compare(variant, problem, options)


@pytest.mark.parametrize("variant", GEMM_VARIANTS)
def test_one_pass_and_recompute_paths_agree(variant):
    """On-policy LENS takes two passes (Triton tiles recomputed in the backward); given its own
    log-probs as ``old_logprobs`` (the ratio is 1 again) it takes the one pass: both give the
    same loss, gradients and calibration."""
    hidden, weight, bias, kwargs = make_linear_problem(temperature=0.8, with_ref=True)
    options = dict(beta=0.05)
    two, two_grads = run(fused("triton", options), hidden, weight, bias, kwargs)
    one, one_grads = run(fused(variant, options), hidden, weight, bias, {**kwargs, "old_logprobs": two.logprobs})
    # The loss is a near-cancelling mean of advantages (~1e-3 here): compared on the scale of one
    # token's term (|A| ~ 1), where the two log-prob computations differ by ~1e-6.
    torch.testing.assert_close(one.loss, two.loss, rtol=0, atol=1e-6)
    for name, a, b in zip(("dh", "dW", "dbias"), one_grads, two_grads):
        check(name, a, b, None, torch.float32)
    for field in ("logprobs", "advantages", "confidence", "difficulty", "kl"):
        check(field, getattr(one, field), getattr(two, field), None, torch.float32)
    assert one.clip_fraction == 0 and two.clip_fraction == 0


@pytest.mark.parametrize("variant", GEMM_VARIANTS)
def test_nan_hidden_states_at_masked_positions_stay_out_of_the_gradients(variant):
    (hidden, weight, bias, kwargs), options = _problem("grpo-on-policy")
    mask = kwargs["completion_mask"]
    poisoned = torch.where(mask[..., None], hidden, float("nan"))
    out, grads = run(fused(variant, options), poisoned, weight, bias, kwargs)
    gold, gold_grads = run(materialised(options), hidden, weight, bias, kwargs)
    check("loss", out.loss, gold.loss, None, torch.float32)
    dh = grads[0]
    assert torch.equal(dh[~mask], torch.zeros_like(dh[~mask])), "masked rows must get dh = 0"
    for name, value, expected in zip(("dh", "dW", "dbias"), grads, gold_grads):
        check(name, value, expected, None, torch.float32)


def test_frozen_weight_and_bias_get_no_gradient_and_grad_output_scales():
    """A frozen lm_head (LoRA-style): only dh is made; ``(0.5 * loss).backward()`` halves it."""
    (hidden, weight, bias, kwargs), options = _problem("lens-off-policy-kl")
    h = hidden.detach().requires_grad_()
    out = linear_api.fused_linear_lens_loss(h, weight, bias=bias, **kwargs, **options, backend="triton")
    (0.5 * out.loss).backward()
    gold_h = hidden.detach().double().requires_grad_()
    gold = materialised(options)(gold_h, weight, bias, kwargs)
    (gold_dh,) = torch.autograd.grad(0.5 * gold.loss, gold_h)
    check("dh", h.grad, gold_dh, None, torch.float32)
    assert weight.grad is None and bias.grad is None


def test_no_grad_call_gives_the_same_outputs():
    problem, options = _problem("grpo-on-policy")
    out, _ = run(fused("triton", options), *problem)
    hidden, weight, bias, kwargs = problem
    with torch.no_grad():
        plain = linear_api.fused_linear_lens_loss(hidden, weight, bias=bias, **kwargs, **options, backend="triton")
    assert not plain.loss.requires_grad
    assert torch.equal(plain.loss, out.loss.detach())
    assert torch.equal(plain.logprobs, out.logprobs)


@pytest.mark.parametrize("variant", GEMM_VARIANTS)
def test_bf16_over_several_row_blocks_no_worse_than_pytorch(variant, monkeypatch):
    """dW summed over five row blocks in bf16 (one rounding per block) stays within PyTorch's
    own bf16 error plus the interpreter's truncation slack."""
    problem, options = _problem("grpo-on-policy", dtype=torch.bfloat16)
    monkeypatch.setattr(linear_blocks, "SCRATCH_BYTES", 8 * 131 * 2)
    compare(variant, problem, options, ulp_slack=1.0)


@pytest.mark.parametrize("variant", GEMM_VARIANTS)
def test_huge_peaked_logits_and_empty_rows(variant):
    """Logits spread over hundreds (a near one-hot softmax), three rows without a completion
    token, temperature 1.3: still the float64 reference's loss and gradients."""
    (hidden, weight, bias, kwargs), options = _problem("grpo-on-policy", empty_rows=3)
    problem = (hidden, weight * 60, bias * 60, {**kwargs, "temperature": 1.3})
    out = compare(variant, problem, options)
    assert out.confidence[:3].eq(0).all(), "rows without tokens have no confidence"
    assert out.confidence[3:].min() < 1e-3, "the case was meant to hold confidently wrong rows"


@pytest.mark.parametrize("case", ["grpo-on-policy", "lens-on-policy"])
def test_compiles_with_fullgraph_and_matches_eager(case):
    """Both fused-linear paths (one pass; the recompute path of on-policy lens) trace without
    graph breaks under torch.compile (aot_eager: the custom ops are opaque either way)."""
    torch._dynamo.reset()
    (hidden, weight, bias, kwargs), options = _problem("grpo-on-policy")
    if case == "lens-on-policy":
        options = {}

    def step(h, w, b):
        out = linear_api.fused_linear_lens_loss(h, w, bias=b, **kwargs, **options, backend="triton",
                                                check_values=False)
        return out.loss, out.advantages

    def grads(fn):
        leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
        loss, adv = fn(*leaves)
        return [loss.detach(), adv, *torch.autograd.grad(loss, leaves)]

    eager = grads(step)
    compiled = grads(torch.compile(step, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    return build_emulated_library(tmp_path_factory.mktemp("csrc_linear"))


@pytest.fixture
def cuda_rows(request, monkeypatch):
    """The cuda backend's row kernels: the built library on a GPU, else csrc/'s host emulation."""
    library.load.cache_clear()
    if DEVICE == "cuda":
        require_gpu_library()
    else:
        monkeypatch.setenv(library.LIBRARY_ENV, str(request.getfixturevalue("emulated")))
        monkeypatch.setenv("LK_EMU_MAX_BLOCKS", "3")
    yield
    library.load.cache_clear()


@pytest.mark.usefixtures("cuda_rows")
@pytest.mark.parametrize("case", ["grpo-on-policy", "lens-off-policy-kl"])
def test_cuda_row_kernels_between_library_gemms(case, monkeypatch):
    """The one-pass loss and the row-block log-probs through the cuda backend's kernels (blocks
    of 7 rows), against the float64 reference."""
    monkeypatch.setattr(linear_blocks, "SCRATCH_BYTES", 7 * 131 * 4 if case.startswith("grpo") else 7 * 203 * 4)
    (hidden, weight, bias, kwargs), loss_options = _problem(case)
    batch, length, dim = hidden.shape
    options = LensOptions(backend="cuda", temperature=kwargs["temperature"],
                          **{k: v for k, v in loss_options.items() if k != "advantages"})
    live = kwargs["completion_mask"]

    def one_pass(h, w, b, kw):
        out = linear_ops.linear_loss_one_pass(
            h.reshape(-1, dim), w, b, kw["target_ids"], live, kw["rewards"], kw.get("old_logprobs"),
            kw.get("ref_logprobs"), None, contiguous_groups(batch, kw["group_size"]), options)
        return SimpleNamespace(**out)

    out, grads = run(one_pass, hidden, weight, bias, kwargs)
    gold, gold_grads = run(materialised(loss_options), hidden, weight, bias, kwargs)
    check("loss", out.loss, gold.loss, None, torch.float32)
    check("logprobs", out.logprobs * live, gold.logprobs * live, None, torch.float32)
    for name, value, expected in zip(("dh", "dW", "dbias"), grads, gold_grads):
        check(name, value, expected, None, torch.float32)

    ids = torch.where(live, kwargs["target_ids"], 0).reshape(-1)
    leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
    logp = linear_ops.linear_token_logprobs(leaves[0].reshape(-1, dim), leaves[1], leaves[2], ids, 0.9, "blocks:cuda")
    gold_leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    z = gold_leaves[0].reshape(-1, dim) @ gold_leaves[1].T + gold_leaves[2]
    gold_logp = torch.log_softmax(z / 0.9, -1).gather(1, ids[:, None])[:, 0]
    weights = torch.linspace(-1, 1, ids.numel(), dtype=torch.float64)
    for name, value, expected in zip(("logp", "dh", "dW", "dbias"),
                                     (logp, *torch.autograd.grad(logp, leaves, weights.float())),
                                     (gold_logp, *torch.autograd.grad(gold_logp, gold_leaves, weights))):
        check(f"blocks:cuda {name}", value, expected, None, torch.float32)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (host-sync detection)")
@pytest.mark.parametrize("gemm", ["auto", "triton"])
def test_one_pass_never_syncs_with_checks_off(gemm):
    """Forward and backward of the one-pass path (lens and grpo, old log-probs given) without a
    device-to-host sync: CUDA graph material.  A first call outside the check compiles (and
    autotunes) the kernels."""
    (hidden, weight, bias, kwargs), options = _problem("lens-off-policy-kl")
    leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
    for mode in ("lens", "grpo"):
        linear_api.fused_linear_lens_loss(*leaves[:2], bias=leaves[2], **kwargs, **{**options, "mode": mode},
                                          backend="triton", check_values=False, gemm=gemm).loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mode in ("lens", "grpo"):
            out = linear_api.fused_linear_lens_loss(*leaves[:2], bias=leaves[2], **kwargs, **{**options, "mode": mode},
                                                    backend="triton", check_values=False, gemm=gemm)
            out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.filterwarnings("ignore::UserWarning")  # the profiler, on blocks allocated before it started
@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU allocator's profile (the GPU benchmark measures CUDA memory)")
def test_memory_is_the_gradients_and_one_block(monkeypatch):
    """Forward and backward of the one-pass path hold the returned gradients, one block of
    logits and O(N) more, never the [N, V] logits (40 x 2003 fp32 = 320 KB here)."""
    from lens_kernels.bench.measure import peak_bytes

    monkeypatch.setenv("KINETO_LOG_LEVEL", "6")
    (hidden, weight, bias, kwargs), options = _problem("lens-off-policy-kl", vocab=2003, dim=8)
    vocab = weight.shape[0]
    monkeypatch.setattr(linear_blocks, "SCRATCH_BYTES", 7 * vocab * 4)
    leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias)]

    def step(_):
        out = linear_api.fused_linear_lens_loss(*leaves[:2], bias=leaves[2], **kwargs, **options, backend="triton")
        return torch.autograd.grad(out.loss, leaves)

    step(None)
    grads = sum(t.numel() * t.element_size() for t in leaves)
    block = 7 * vocab * 4
    assert hidden.shape[0] * hidden.shape[1] * vocab * 4 > block + 64 * 1024, "the case must tell the two apart"
    peak = peak_bytes(step, None, torch.device("cpu"))
    assert peak <= grads + block + 32 * 1024, f"peak {peak} B: more than the gradients ({grads} B) and one block ({block} B)"


@pytest.mark.parametrize("fn", ["linear", "logits"])
def test_retained_graph_gives_the_same_gradient_on_every_backward(fn):
    """The gradient made in the forward is scaled in place: a second backward of a retained
    graph must still return grad_output * gradient, not grad_output**2 * gradient."""
    (hidden, weight, bias, kwargs), options = _problem("lens-off-policy-kl")
    h = hidden.detach().requires_grad_()
    if fn == "linear":
        loss = linear_api.fused_linear_lens_loss(h, weight, bias=bias, **kwargs, **options, backend="triton").loss
    else:
        import lens_kernels as lk
        ids = torch.where(kwargs["completion_mask"], kwargs["target_ids"], 0)
        loss = lk.fused_lens_loss(h @ weight.T + bias, **{**kwargs, "target_ids": ids}, **options,
                                  backend="triton").loss
    first = torch.autograd.grad(0.5 * loss, h, retain_graph=True)[0].clone()
    second = torch.autograd.grad(0.5 * loss, h, retain_graph=True)[0].clone()
    third = torch.autograd.grad(2.0 * loss, h)[0]
    torch.testing.assert_close(second, first)
    torch.testing.assert_close(third, 4 * first)


def test_triton_gemms_see_rows_with_work_first(monkeypatch):
    """gemm="triton": the block GEMMs get the rows sorted "may have a gradient, other live, the
    rest" (so that their row tiles are all work or all skipped), each class in the callers'
    order; the outputs come back in the callers' order (the reference comparisons above)."""
    from lens_kernels.backends.triton import linear_block_gemm

    seen = {}
    original = linear_block_gemm.TritonBlockGemms.__init__

    def spy(self, hidden, weight, bias, live, coefficient, span):
        seen.update(hidden=hidden, live=live, coefficient=coefficient)
        original(self, hidden, weight, bias, live, coefficient, span)

    monkeypatch.setattr(linear_block_gemm.TritonBlockGemms, "__init__", spy)
    (hidden, weight, bias, kwargs), options = _problem("grpo-on-policy")
    out, _ = run(fused("triton-gemm", options), hidden, weight, bias, kwargs)
    live = kwargs["completion_mask"].reshape(-1)
    work = live & (out.advantages != 0)[:, None].expand_as(kwargs["completion_mask"]).reshape(-1)
    key = 2 - live.int() - work.int()
    order = torch.cat([torch.nonzero(key == k).squeeze(1) for k in range(3)])
    assert 0 < int(work.sum()) < int(live.sum()) < live.numel(), "the case must hold all three classes"
    assert torch.equal(seen["live"], live[order]) and torch.equal(seen["coefficient"] != 0, work[order])
    assert torch.equal(seen["hidden"], hidden.reshape(-1, hidden.shape[-1])[order])
