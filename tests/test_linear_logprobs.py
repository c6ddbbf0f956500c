"""``fused_linear_token_logprobs`` (both backends) against log-probs of the materialised
``hidden @ weight.T + bias`` in float64: values, ``dh``, ``dW``, ``dbias``.

Triton runs through the interpreter on the CPU (fp32 inputs compare at IEEE dot precision),
so shapes are tiny but cross every tile, split and chunk boundary: N, d and V are not
multiples of any block (the interpreter's blocks are 16 x 32 x 16).
"""
from __future__ import annotations

import re

import pytest
import torch

import lens_kernels as lk
from lens_kernels import linear_ops
from lens_kernels.backends import torch_linear
from lens_kernels.linear_api import fused_linear_token_logprobs

from .conftest import DEVICE, interpreting, runnable_backends
from .tolerances import check

# "triton" is the default (Triton logit tiles); "triton-library" the cuBLAS row blocks (gemm="library").
BACKENDS = [b for b in runnable_backends() if b != "cuda"]
BACKENDS += ["triton-library"] if "triton" in BACKENDS else []
PATHS = {"torch": "torch", "triton": "tiles", "triton-library": "blocks"}


def options(variant: str) -> dict:
    """``backend`` and ``gemm`` keywords of a test variant."""
    return dict(backend="triton", gemm="library") if variant == "triton-library" else dict(backend=variant)


def make_linear(batch=2, length=19, dim=41, vocab=203, *, bias=True, scale=1.0, offset=0.0, dtype=torch.float32,
                seed=0, strided=False):
    """``(hidden [B, T, d], weight [V, d], bias [V] or None, target_ids [B, T])``; logits have
    roughly ``scale`` times unit spread around ``offset``.  ``strided``: hidden is the view
    ``full[:, :-1]`` and weight the transpose of a ``[d, V]`` tensor (non-contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(batch, length + 1, dim, generator=gen)
    hidden = full[:, :-1] if strided else full[:, :-1].contiguous()
    weight = torch.randn(dim, vocab, generator=gen).T * (scale / dim**0.5)
    weight = weight if strided else weight.contiguous()
    b = torch.randn(vocab, generator=gen) * scale * 0.3 + offset if bias else None
    targets = torch.randint(0, vocab, (batch, length), generator=gen)
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), targets.to(DEVICE)


def materialised_logprobs(hidden, weight, bias, targets, temperature, compute_dtype=torch.float64):
    """``log softmax`` of the materialised logits, in ``compute_dtype`` (float64: the gold;
    the inputs' dtype: PyTorch's own result in that dtype)."""
    z = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        z = z + bias.to(compute_dtype)
    return lk.reference.token_logprobs(z, targets, temperature, compute_dtype)


def logprobs_and_grads(fn, inputs, grad_out, **kwargs):
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs[:3]]
    logp = fn(*leaves, inputs[3], **kwargs)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(logp, wanted, grad_outputs=grad_out.to(logp.dtype))
    return logp, grads


def compare(backend, inputs, temperature=1.0, grad_out=None, ulp_slack=0.0):
    hidden, weight, bias, targets = inputs
    dtype = hidden.dtype
    if grad_out is None:
        grad_out = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    before = [None if t is None else t.clone() for t in inputs]
    logp, grads = logprobs_and_grads(
        lambda h, w, b, t: fused_linear_token_logprobs(h, w, t, temperature, bias=b, **options(backend)),
        inputs, grad_out)
    gold, gold_grads = logprobs_and_grads(
        lambda h, w, b, t: materialised_logprobs(h, w, b, t, temperature), inputs, grad_out)
    native, native_grads = (None, [None] * 3)
    if dtype != torch.float32:
        native, native_grads = logprobs_and_grads(
            lambda h, w, b, t: materialised_logprobs(h, w, b, t, temperature, dtype), inputs, grad_out)
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    check("logp", logp, gold, native, dtype)
    for name, value, expected, own in zip(("dh", "dW", "dbias"), grads, gold_grads, native_grads):
        assert value.dtype == dtype
        check(name, value, expected, own, dtype, ulp_slack)
    for t, b in zip(inputs, before):
        assert t is None or torch.equal(t, b), "an input was modified"
    return logp, grads


# id -> (make_linear options, temperature)
CASES = {
    "v1003-bias-tau0.7": (dict(vocab=1003), 0.7),
    "no-bias-strided": (dict(bias=False, strided=True), 1.0),
    "huge-peaked": (dict(scale=400.0), 1.3),
    "all-negative": (dict(scale=3.0, offset=-200.0), 1.0),
}


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_against_materialised_float64(backend, case):
    options, temperature = CASES[case]
    compare(backend, make_linear(**options), temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_no_worse_than_pytorch(backend):
    slack = 1.0 if backend.startswith("triton") and interpreting() else 0.0  # the interpreter truncates to bf16
    compare(backend, make_linear(scale=4.0, dtype=torch.bfloat16), 1.0, ulp_slack=slack)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter, on the NaN rows' forward
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_with_zero_gradient_are_skipped_and_stay_zero(backend):
    """g == 0 rows (masked positions, zero advantages) give dh = 0 exactly and add nothing to
    dW, even when their target is the -100 label and their hidden state is not finite."""
    hidden, weight, bias, targets = make_linear(batch=3, length=17)
    grad_out = torch.randn(targets.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grad_out[0] = 0  # a whole row block (16 rows) dead, the rest live
    grad_out[2, 5:] = 0
    live = grad_out != 0
    targets = torch.where(live, targets, -100)
    hidden = torch.where(live[..., None], hidden, float("nan"))
    logp, (dh, dw, db) = logprobs_and_grads(
        lambda h, w, b, t: linear_ops.linear_token_logprobs(h.view(-1, h.shape[-1]), w, b, t.view(-1), 1.0, PATHS[backend]),
        (hidden, weight, bias, targets), grad_out.view(-1))
    assert torch.equal(dh.view_as(hidden)[~live], torch.zeros_like(hidden[~live]))
    gold, (_, gold_dw, gold_db) = logprobs_and_grads(
        lambda h, w, b, t: materialised_logprobs(h, w, b, t, 1.0),
        (hidden[live][None], weight, bias, targets[live][None]), grad_out[live][None])
    check("logp", logp.view_as(targets)[live], gold[0], None, torch.float32)
    check("dW", dw, gold_dw, None, torch.float32)
    check("dbias", db, gold_db, None, torch.float32)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter, on the NaN rows' forward
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_that_are_not_live_get_zero_and_no_gradient(backend):
    """``live`` (the loss path's completion mask): rows that are False get log-prob 0 and no
    gradient whatever their hidden state, target or incoming gradient; live rows are exact."""
    hidden, weight, bias, targets = make_linear(batch=3, length=17)
    live = torch.ones(targets.shape, dtype=torch.bool, device=DEVICE)
    live[0] = False  # a whole row tile of the interpreter's 16-row tiles
    live[2, 5:] = False
    targets = torch.where(live, targets, -100)
    hidden = torch.where(live[..., None], hidden, float("nan"))
    grad_out = torch.randn(targets.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    logp, (dh, dw, db) = logprobs_and_grads(
        lambda h, w, b, t: linear_ops.linear_token_logprobs(
            h.view(-1, h.shape[-1]), w, b, t.view(-1), 1.0, PATHS[backend], live.view(-1)),
        (hidden, weight, bias, targets), grad_out.view(-1))
    logp = logp.view_as(targets)
    assert torch.equal(logp[~live], torch.zeros_like(logp[~live]))
    assert torch.equal(dh.view_as(hidden)[~live], torch.zeros_like(hidden[~live]))
    gold, (_, gold_dw, gold_db) = logprobs_and_grads(
        lambda h, w, b, t: materialised_logprobs(h, w, b, t, 1.0),
        (hidden[live][None], weight, bias, targets[live][None]), grad_out[live][None])
    check("logp", logp[live], gold[0], None, torch.float32)
    check("dW", dw, gold_dw, None, torch.float32)
    check("dbias", db, gold_db, None, torch.float32)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter, on the NaN rows' forward
@pytest.mark.parametrize("backend", BACKENDS)
def test_completion_mask_gives_zero_outside_it(backend):
    """``fused_linear_token_logprobs(..., completion_mask=)``: 0 and no gradient outside the
    mask whatever the ids (-100) and hidden states (NaN) there; the masked positions as without
    a mask."""
    hidden, weight, bias, targets = make_linear(batch=3, length=17)
    mask = torch.rand(targets.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE) < 0.6
    mask[1] = False
    clean, (gold_dh, gold_dw, gold_db) = logprobs_and_grads(
        lambda h, w, b, t: fused_linear_token_logprobs(h, w, t, bias=b, **options(backend)),
        (hidden, weight, bias, targets), mask.float())
    poisoned = torch.where(mask[..., None], hidden, float("nan"))
    logp, (dh, dw, db) = logprobs_and_grads(
        lambda h, w, b, t: fused_linear_token_logprobs(h, w, t, bias=b, completion_mask=mask.int(), **options(backend)),
        (poisoned, weight, bias, torch.where(mask, targets, -100)), torch.ones_like(mask, dtype=torch.float32))
    assert torch.equal(logp[~mask], torch.zeros_like(logp[~mask]))
    assert torch.equal(dh[~mask], torch.zeros_like(dh[~mask]))
    check("logp", logp[mask], clean[mask], None, torch.float32)
    check("dh", dh[mask], gold_dh[mask], None, torch.float32)
    check("dW", dw, gold_dw, None, torch.float32)
    check("dbias", db, gold_db, None, torch.float32)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton does not run here")
def test_forward_skips_row_tiles_with_no_live_row():
    """The tiles' forward GEMM never runs for a row tile with no live row: its partials keep
    their initial values (max -inf), while a tile with one live row is computed in full."""
    from lens_kernels.backends.triton.linear_forward import _partials_kernel, partials
    from lens_kernels.backends.triton.linear_tile import tiles_for

    def problem(rows):
        hidden, weight, bias, targets = make_linear(batch=1, length=rows, vocab=101)
        return hidden.view(rows, -1), weight, bias, targets.view(-1)

    hidden, weight, bias, targets = problem(8)
    tiles = tiles_for(hidden.dtype, hidden.device)
    partials(hidden, weight, bias, targets, None, 1.0, tiles)  # picks the row tile (autotuned, N not in the key)
    block = _partials_kernel.best_config.kwargs["BLOCK_N"]
    hidden, weight, bias, targets = problem(3 * block)
    live = torch.zeros(3 * block, dtype=torch.bool, device=DEVICE)
    live[block + 3] = True  # the second row tile holds one live row
    m, s, _ = partials(hidden, weight, bias, targets, live, 1.0, tiles)
    tile = torch.arange(3 * block, device=DEVICE) // block
    assert torch.isinf(m[:, tile != 1]).all() and (s[:, tile != 1] == 0).all()
    assert torch.isfinite(m[:, tile == 1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_vocabulary_chunks(backend, monkeypatch):
    """The backward's vocabulary chunks (dZ scratch / column chunks) at their smallest."""
    if backend == "triton":
        from lens_kernels.backends.triton import linear_backward
        monkeypatch.setattr(linear_backward, "SCRATCH_BYTES", 1)  # one 32-column tile per chunk
    elif backend == "triton-library":
        from lens_kernels.backends import linear_blocks
        monkeypatch.setattr(linear_blocks, "SCRATCH_BYTES", 5 * 101 * 4)  # blocks of 5 rows
    else:
        monkeypatch.setattr(torch_linear, "MAX_COLS", 37)
        monkeypatch.setattr(torch_linear, "CHUNK_BYTES", 3 * 37 * 4 * 5)  # 5 rows per rectangle
    compare(backend, make_linear(batch=1, length=23, vocab=101), 0.9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    hidden, weight, bias, targets = make_linear(batch=2, length=0)
    logp, (dh, dw, db) = logprobs_and_grads(
        lambda h, w, b, t: fused_linear_token_logprobs(h, w, t, bias=b, **options(backend)),
        (hidden, weight, bias, targets), torch.zeros(2, 0, device=DEVICE))
    assert logp.shape == (2, 0) and dh.shape == hidden.shape
    assert torch.count_nonzero(dw) == 0 and torch.count_nonzero(db) == 0


def test_float64_on_the_torch_backend_is_exact():
    inputs = make_linear(dtype=torch.float64, vocab=57)
    logp = fused_linear_token_logprobs(inputs[0], inputs[1], inputs[3], 0.8, bias=inputs[2], backend="torch")
    assert logp.dtype == torch.float64
    gold = materialised_logprobs(*inputs, 0.8)
    assert torch.allclose(logp, gold, rtol=1e-12, atol=1e-12)
    inputs = make_linear(batch=1, length=3, dim=4, vocab=7, dtype=torch.float64)
    leaves = [t.detach().requires_grad_() for t in inputs[:3]]
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused_linear_token_logprobs(h, w, inputs[3], 0.8, bias=b, backend="torch"),
        leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_weight_gets_both_gradients(backend):
    """An embedding and the output layer sharing one weight: autograd adds both gradients."""
    hidden, weight, _, targets = make_linear(vocab=67)
    weight = weight.detach().requires_grad_()
    tied = torch.nn.functional.embedding(targets, weight)  # [B, T, d], the input side
    logp = fused_linear_token_logprobs(hidden + tied, weight, targets, **options(backend))
    (grad,) = torch.autograd.grad(logp.sum(), weight)
    gold_weight = weight.detach().double().requires_grad_()
    gold_hidden = hidden.double() + torch.nn.functional.embedding(targets, gold_weight)
    gold = materialised_logprobs(gold_hidden, gold_weight, None, targets, 1.0)
    (gold_grad,) = torch.autograd.grad(gold.sum(), gold_weight)
    check("tied dW", grad, gold_grad, None, torch.float32)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(hidden=torch.zeros(4)), ValueError, "hidden: expected shape [B, T, d] or packed [N, d] with d >= 1"),
        (dict(hidden=torch.zeros(6, 4)), ValueError, "target_ids: expected shape [6] (hidden.shape[:1], packed"),
        (dict(hidden=torch.zeros(3, 4), target_ids=torch.tensor([0, 7, 1])), ValueError,
         "target_ids: expected ids in [0, 5) (V = logits.shape[-1]), found 7 at [1]"),
        (dict(weight=torch.zeros(5, 7)), ValueError, "weight: expected shape [V, d]"),
        (dict(weight=torch.zeros(5, 4, dtype=torch.float16)), TypeError, "weight: expected the dtype of hidden"),
        (dict(bias=torch.zeros(6)), ValueError, "bias: expected shape [5]"),
        (dict(target_ids=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "target_ids: expected dtype int64"),
        (dict(target_ids=torch.full((2, 3), 5)), ValueError, "target_ids: expected ids in [0, 5)"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(backend="tiles"), ValueError, "backend: expected one of"),
        (dict(backend="cuda"), ValueError, "backend: 'cuda' is not available for tensors on cpu"),
        (dict(gemm="cublas"), ValueError, "gemm: expected one of ['auto', 'library', 'triton']"),
        (dict(gemm="triton"), ValueError, "gemm: 'triton' (Triton GEMMs) needs backend='triton'"),
        (dict(target_ids=torch.zeros(3, 2, dtype=torch.int64)), ValueError, "target_ids: expected shape [2, 3]"),
        (dict(completion_mask=torch.ones(3, 2, dtype=torch.bool)), ValueError, "completion_mask: expected shape [2, 3]"),
        (dict(completion_mask=torch.full((2, 3), 2)), ValueError, "completion_mask: expected bool or values in {0, 1}"),
        (dict(completion_mask=torch.tensor([[True, True, False]] * 2), target_ids=torch.tensor([[0, 1, 9]] * 2)),
         None, None),
        (dict(return_entropy=1), TypeError, "return_entropy: expected a bool, got int"),
    ],
    ids=["hidden-1d", "packed-ids-shape", "packed-ids-range", "weight-d", "weight-dtype", "bias-shape", "ids-int32", "ids-range", "temperature", "backend",
         "backend-cuda-on-cpu",
         "gemm", "gemm-torch", "ids-shape", "mask-shape", "mask-values", "ids-anything-outside-the-mask",
         "return-entropy"],
)
def test_bad_arguments_are_named(change, error, message):
    args = dict(hidden=torch.zeros(2, 3, 4), weight=torch.zeros(5, 4), target_ids=torch.zeros(2, 3, dtype=torch.int64),
                temperature=1.0, bias=None, backend="torch")
    args.update(change)
    if error is None:  # accepted
        assert fused_linear_token_logprobs(**args).shape == (2, 3)
        return
    with pytest.raises(error, match=re.escape(message)):
        fused_linear_token_logprobs(**args)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton does not run here")
def test_tiles_get_the_live_rows_packed_first(monkeypatch):
    """With a mask, the Triton tiles' op sees the live rows first (in order), then the rest:
    row tiles are all live or all skipped; the log-probs and gradients come back in place."""
    seen = {}
    op = linear_ops._linear_fwd

    def spy(hidden, weight, bias, target_ids, live, inv_t, path, entropy):
        seen.update(live=live, ids=target_ids)
        return op(hidden, weight, bias, target_ids, live, inv_t, path, entropy)

    monkeypatch.setattr(linear_ops, "_linear_fwd", spy)
    hidden, weight, bias, targets = make_linear(batch=3, length=17)
    mask = torch.rand(targets.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE) < 0.5
    logp = fused_linear_token_logprobs(hidden, weight, targets, bias=bias, completion_mask=mask, backend="triton")
    live = mask.reshape(-1)
    count = int(live.sum())
    assert 0 < count < live.numel()
    assert seen["live"][:count].all() and not seen["live"][count:].any()
    assert torch.equal(seen["ids"][:count], targets.reshape(-1)[live])
    gold = materialised_logprobs(hidden, weight, bias, targets, 1.0)
    check("logp", logp[mask], gold[mask], None, torch.float32)
