"""The Triton launchers, called directly, against ``lens_kernels.reference`` in float64.

Without CUDA the kernels run under Triton's interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before triton is imported, unless the environment says otherwise), so
shapes stay tiny.  Cases that need a GPU (large vocabularies, 64-bit offsets, ``T = 65536``,
compile counts) are marked ``gpu`` and skipped without CUDA.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lens_kernels import reference  # noqa: E402
from lens_kernels.backends import triton as triton_backend  # noqa: E402
from lens_kernels.backends.triton import logprobs as triton_logprobs  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
pytestmark = pytest.mark.skipif(
    not triton_backend.is_available(DEVICE), reason=f"Triton backend not available on {DEVICE}"
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

RTOL = 1e-5
# Elementwise slack for gradients stored in a narrow dtype: one unit in the last place (the
# GPU rounds to nearest; the CPU interpreter truncates fp32 -> bf16, up to a whole ulp).
ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def assert_close(name: str, value: torch.Tensor, gold: torch.Tensor, ulp: float = 0.0) -> None:
    """``|value - gold| <= RTOL * max|gold| + ulp * |gold|`` elementwise (matching infinities)."""
    assert value.shape == gold.shape, f"{name}: shape {tuple(value.shape)} != {tuple(gold.shape)}"
    value, gold = value.double().cpu(), gold.detach().double().cpu()
    assert not value.isnan().any(), f"{name}: NaN"
    same_inf = value.isinf() & gold.isinf() & (value.sign() == gold.sign())
    finite = gold[gold.isfinite()]
    scale = max(float(finite.abs().max()) if finite.numel() else 0.0, 1e-6)
    err = torch.where(same_inf, 0.0, (value - gold).abs())
    bound = torch.where(same_inf, 0.0, RTOL * scale + ulp * gold.abs())
    worst = int((err - bound).argmax()) if err.numel() else 0
    assert (err <= bound).all(), (
        f"{name}: error {float(err.flatten()[worst]):.3g} > {float(bound.flatten()[worst]):.3g} "
        f"at flat index {worst} (value {float(value.flatten()[worst]):.8g}, gold {float(gold.flatten()[worst]):.8g})"
    )


# ---------------------------------------------------------------------------------------------
# Vocabulary pass
# ---------------------------------------------------------------------------------------------

# id -> (B, T, V, dtype, temperature, layout); layout: "contiguous", "shifted" (full[:, :-1] with
# targets ids[:, 1:], both non-contiguous), "vocab-strided" (stride_v != 1), "leading-inf"
# (the whole first BLOCK_V chunk is -inf).
VOCAB_CASES = {
    "v1000-fp32": (2, 3, 1000, torch.float32, 1.0, "contiguous"),
    "v1000-fp32-shifted": (2, 3, 1000, torch.float32, 1.0, "shifted"),
    "v37-fp32-tau0.7": (3, 4, 37, torch.float32, 0.7, "contiguous"),
    "v50257-fp32-shifted": (2, 2, 50257, torch.float32, 1.0, "shifted"),
    "v1000-bf16-shifted": (2, 3, 1000, torch.bfloat16, 1.0, "shifted"),
    "v8193-bf16-two-chunks": (1, 3, 8193, torch.bfloat16, 1.3, "shifted"),
    "v1000-fp16": (2, 3, 1000, torch.float16, 1.0, "contiguous"),
    "v1000-fp32-vocab-strided": (2, 3, 1000, torch.float32, 1.0, "vocab-strided"),
    "v5000-fp32-leading-inf": (2, 2, 5000, torch.float32, 1.0, "leading-inf"),
}


def make_logits(batch, length, vocab, dtype, layout, seed=0):
    """``(logits, target_ids)`` laid out as ``layout`` says (see ``VOCAB_CASES``)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length + 1), generator=gen)
    if layout == "vocab-strided":
        logits = (torch.randn(vocab, batch, length, generator=gen) * 3).permute(1, 2, 0)
        assert logits.stride(-1) != 1
        return logits.to(DEVICE, dtype), ids[:, 1:].contiguous().to(DEVICE)
    full = torch.randn(batch, length + 1, vocab, generator=gen) * 3
    if layout == "leading-inf":
        full[..., : vocab - 904] = float("-inf")
        ids = torch.randint(vocab - 904, vocab, (batch, length + 1), generator=gen)
    full = full.to(DEVICE, dtype)
    if layout == "shifted":
        return full[:, :-1], ids[:, 1:].to(DEVICE)
    return full[:, :-1].contiguous(), ids[:, 1:].contiguous().to(DEVICE)


def gold_logprobs(logits, target_ids, temperature):
    """Float64 ``(logp, lse)`` of the reference, ``logp`` differentiable in the float64 leaf."""
    leaf = logits.detach().double().requires_grad_()
    logp = reference.token_logprobs(leaf, target_ids, temperature)
    return leaf, logp, torch.logsumexp(leaf.detach() / temperature, -1)


@pytest.mark.parametrize("case", list(VOCAB_CASES))
def test_logprobs_forward_and_backward(case):
    batch, length, vocab, dtype, temperature, layout = VOCAB_CASES[case]
    logits, target_ids = make_logits(batch, length, vocab, dtype, layout)
    before = logits.clone()

    logp, lse, _ = triton_backend.logprobs_forward(logits, target_ids, 1.0 / temperature)
    leaf, gold_logp, gold_lse = gold_logprobs(logits, target_ids, temperature)
    assert logp.dtype == torch.float32 and lse.dtype == torch.float64 and logp.is_contiguous()
    assert_close("logp", logp, gold_logp)
    assert_close("lse", lse, gold_lse)

    grad_logp = torch.randn(batch, length, device=DEVICE)
    grad_logp[0, 1] = 0.0
    grad = triton_backend.logprobs_backward(grad_logp, logits, target_ids, lse, 1.0 / temperature, False)
    (gold_grad,) = torch.autograd.grad(gold_logp, leaf, grad_logp.double())
    assert grad.dtype == dtype and grad.is_contiguous() and grad.shape == logits.shape
    assert_close("grad", grad, gold_grad, ULP[dtype])
    assert torch.count_nonzero(grad[0, 1]) == 0
    assert torch.equal(logits, before), "logits were modified"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inplace_backward_writes_through_strided_view(dtype):
    logits, target_ids = make_logits(2, 4, 1000, dtype, "shifted")
    full = logits._base if logits._base is not None else logits
    last_position = full[:, -1].clone()
    logp, lse, _ = triton_backend.logprobs_forward(logits, target_ids, 1.0)
    leaf, gold_logp, _ = gold_logprobs(logits, target_ids, 1.0)
    grad_logp = torch.randn(2, 4, device=DEVICE)
    (gold_grad,) = torch.autograd.grad(gold_logp, leaf, grad_logp.double())

    out = triton_backend.logprobs_backward(grad_logp, logits, target_ids, lse, 1.0, True)
    assert out.data_ptr() == logits.data_ptr() and out.stride() == logits.stride()
    assert_close("inplace grad", logits, gold_grad, ULP[dtype])
    assert torch.equal(full[:, -1], last_position), "wrote outside the view"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: inf - inf
def test_zero_gradient_rows_ignore_non_finite_logits():
    logits, target_ids = make_logits(2, 3, 1000, torch.float32, "contiguous")
    clean_logp, lse, _ = triton_backend.logprobs_forward(logits, target_ids, 1.0)
    logits[1, 2] = float("nan")
    logits[0, 0, :10] = float("inf")
    grad_logp = torch.ones(2, 3, device=DEVICE)
    grad_logp[1, 2] = grad_logp[0, 0] = 0.0
    grad = triton_backend.logprobs_backward(grad_logp, logits, target_ids, lse, 1.0, False)
    assert torch.count_nonzero(grad[1, 2]) == 0 and torch.count_nonzero(grad[0, 0]) == 0
    assert torch.isfinite(grad).all()
    logp, _, _ = triton_backend.logprobs_forward(logits, target_ids, 1.0)
    assert torch.isnan(logp[1, 2]) and torch.equal(logp[0, 1:], clean_logp[0, 1:])


# ---------------------------------------------------------------------------------------------
# Epilogue
# ---------------------------------------------------------------------------------------------

# Groups of 3: negative, mixed, all-correct, mixed with fractional rewards.
REWARDS = [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.0, 0.25]
GROUP_LABELS = [5, 2, 5, 9, 2, 9, 9, 5, 9, 2, 9, 9]  # sizes 3, 3, 6: BLOCK_G 8, not contiguous
GROUP_LABEL_REWARDS = [0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
GARBAGE = 30.0  # what masked-out positions of logp/old/ref hold: must never reach an output


# ---------------------------------------------------------------------------------------------
# GPU only: sizes the interpreter cannot reach
# ---------------------------------------------------------------------------------------------


def _rows_gold(logits, target_ids, rows):
    """Float64 ``logp`` and ``d logp / d logits`` (times 1) for the flat rows ``rows`` only."""
    flat = logits.reshape(-1, logits.shape[-1])
    leaf = flat[rows].double().requires_grad_()
    logp = leaf.log_softmax(-1).gather(-1, target_ids.reshape(-1)[rows].unsqueeze(-1)).squeeze(-1)
    (grad,) = torch.autograd.grad(logp.sum(), leaf)
    return logp, grad


@gpu
@needs_cuda
def test_gpu_qwen_vocabulary_bf16():
    logits, target_ids = make_logits(2, 3, 151936, torch.bfloat16, "shifted")
    logp, lse, _ = triton_backend.logprobs_forward(logits, target_ids, 1.0)
    leaf, gold_logp, gold_lse = gold_logprobs(logits, target_ids, 1.0)
    assert_close("logp", logp, gold_logp)
    assert_close("lse", lse, gold_lse)
    grad_logp = torch.randn(2, 3, device=DEVICE)
    grad = triton_backend.logprobs_backward(grad_logp, logits, target_ids, lse, 1.0, False)
    (gold_grad,) = torch.autograd.grad(gold_logp, leaf, grad_logp.double())
    assert_close("grad", grad, gold_grad, ULP[torch.bfloat16])


@gpu
@needs_cuda
def test_gpu_offsets_beyond_int32():
    batch, length, vocab = 1, 14200, 151936
    assert batch * length * vocab >= 2**31
    logits = torch.randn(batch, length, vocab, device=DEVICE, dtype=torch.bfloat16)
    target_ids = torch.randint(0, vocab, (batch, length), device=DEVICE)
    logp, lse, _ = triton_backend.logprobs_forward(logits, target_ids, 1.0)
    rows = torch.tensor([0, 1, length - 2, length - 1], device=DEVICE)
    gold_logp, gold_grad = _rows_gold(logits, target_ids, rows)
    assert_close("logp (first and last rows)", logp.reshape(-1)[rows], gold_logp)
    grad = triton_backend.logprobs_backward(torch.ones_like(logp), logits, target_ids, lse, 1.0, True)
    assert_close("grad (first and last rows)", grad.reshape(-1, vocab)[rows], gold_grad, ULP[torch.bfloat16])


@gpu
@needs_cuda
def test_gpu_long_sequence():
    logits, target_ids = make_logits(2, 65536, 96, torch.float32, "shifted")
    logp, lse, _ = triton_backend.logprobs_forward(logits, target_ids, 1.0)
    leaf, gold_logp, _ = gold_logprobs(logits, target_ids, 1.0)
    assert_close("logp", logp, gold_logp)
    grad_logp = torch.randn(2, 65536, device=DEVICE)
    grad = triton_backend.logprobs_backward(grad_logp, logits, target_ids, lse, 1.0, False)
    (gold_grad,) = torch.autograd.grad(gold_logp, leaf, grad_logp.double())
    assert_close("grad", grad, gold_grad)


@gpu
@needs_cuda
def test_gpu_no_recompile_per_length_or_vocabulary():
    kernel = triton_logprobs._logprobs_fwd_kernel

    def compiled():
        return sum(len(cache[0]) for cache in kernel.device_caches.values())

    # Odd T and V keep every stride's divisibility class the same: one compilation.
    shapes = [(2, 5, 1001), (2, 9, 1003), (3, 7, 1019), (1, 33, 1001)]
    counts = []
    for batch, length, vocab in shapes:
        logits, target_ids = make_logits(batch, length, vocab, torch.bfloat16, "contiguous")
        triton_backend.logprobs_forward(logits, target_ids, 1.0)
        counts.append(compiled())
    assert counts[-1] == counts[0], f"recompiled across T/V: compiled kernels {counts}"
