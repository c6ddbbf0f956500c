"""``fused_linear_token_logprobs(..., return_entropy=True)`` on every fused-linear path against
the float64 log-softmax of the materialised logits: log-probs, entropies and the gradients to
hidden, weight and bias of each alone and of both together; packed ``[N, d]`` inputs against
padded ones; the completion mask; the unbiased temperature scaling at ``|logits| ~ 1e3``.

Paths: ``torch`` (chunked matmuls), ``triton`` (logit tiles), ``triton-library`` (library GEMMs
on row blocks + the Triton row kernels) and ``cuda`` (the same with csrc/'s row kernels: the
built library on a GPU, its host emulation on the CPU).  Triton runs through the interpreter
on the CPU: shapes are small and not multiples of any block.
"""
from __future__ import annotations

import pytest
import torch

from lens_kernels import linear_ops
from lens_kernels.backends.cuda import library
from lens_kernels.linear_api import fused_linear_token_logprobs

from .conftest import DEVICE, interpreting, runnable_backends
from .test_cuda_backend import build_emulated_library, require_gpu_library
from .tolerances import FP32_RTOL, check, max_error

PATHS = [b for b in runnable_backends() if b != "cuda"]
PATHS += ["triton-library"] if "triton" in PATHS else []
PATHS += ["cuda"]
KEYWORDS = {"torch": dict(backend="torch"), "triton": dict(backend="triton"),
            "triton-library": dict(backend="triton", gemm="library")}


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    return build_emulated_library(tmp_path_factory.mktemp("csrc_emulated"))


@pytest.fixture
def path(request, monkeypatch):
    """The path under test; ``cuda`` loads the built library on a GPU, else the host emulation."""
    name = request.param
    if name == "cuda":
        library.load.cache_clear()
        if DEVICE == "cuda":
            require_gpu_library()
        else:
            monkeypatch.setenv(library.LIBRARY_ENV, str(request.getfixturevalue("emulated")))
            monkeypatch.setenv("LK_EMU_MAX_BLOCKS", "3")
    yield name
    if name == "cuda":
        library.load.cache_clear()


def paths(*names):
    return pytest.mark.parametrize("path", [p for p in PATHS if not names or p in names], indirect=True)


def logprobs_entropy(path, hidden, weight, bias, targets, temperature, mask=None):
    """``(logp, entropy)`` through ``path``: the public function, or (cuda, which the public
    function only takes for CUDA tensors) the row-block op it calls."""
    if path != "cuda" or DEVICE == "cuda":
        keywords = KEYWORDS.get(path, dict(backend=path))
        return fused_linear_token_logprobs(hidden, weight, targets, temperature, bias=bias, completion_mask=mask,
                                           return_entropy=True, **keywords)
    lead, dim = hidden.shape[:-1], hidden.shape[-1]
    live = None if mask is None else mask.reshape(-1).bool()
    logp, ent = linear_ops.linear_token_logprobs(hidden.reshape(-1, dim), weight, bias, targets.reshape(-1),
                                                 temperature, "blocks:cuda", live, entropy=True)
    return logp.view(lead), ent.view(lead)


def materialised(hidden, weight, bias, targets, temperature, compute_dtype=torch.float64):
    """``(logp, entropy)`` of the materialised logits in ``compute_dtype`` (float64: the gold;
    the inputs' dtype: PyTorch's own result there)."""
    z = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        z = z + bias.to(compute_dtype)
    log_p = torch.log_softmax(z / temperature, -1)
    p = log_p.exp()
    entropy = -(p * torch.where(p > 0, log_p, 0)).sum(-1)  # -inf logits add 0
    return log_p.gather(-1, targets.clamp(0, z.shape[-1] - 1)[..., None])[..., 0], entropy


def check_entropy_part(name, value, gold, own, dtype, ulp_slack=0.0):
    """An entropy or an entropy gradient: in fp32 within 1e-5 of the gold or no worse than
    PyTorch's own fp32 (``own``), whichever is larger.  The entropy's absolute error grows with
    the logits' magnitude (``d H / d z = -p (log p + H)`` meets fp32 logits' rounding, ~1e-5 at
    ``|z| ~ 150``) where SPEC 3's 1e-5 bounds the log-prob's; bf16/fp16 as ``check``."""
    if dtype != torch.float32:
        return check(name, value, gold, own, dtype, ulp_slack)
    assert not torch.isnan(value).any(), f"{name}: NaN in output"
    bound = max_error(own, gold) + FP32_RTOL * max(float(gold.abs().max()), 1e-6)
    assert max_error(value, gold) <= bound, f"{name}: max error {max_error(value, gold):.3g} > {bound:.3g}"


def make(rows=37, dim=24, vocab=1000, *, scale=1.0, offset=0.0, minus_inf=0, dtype=torch.float32, seed=0):
    """Packed ``(hidden [N, d], weight [V, d], bias [V], target_ids [N])``, logits of about
    ``scale`` times unit spread around ``offset``; ``minus_inf`` vocabulary columns with a
    ``-inf`` bias (never a target)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) * (scale / dim**0.5)
    bias = torch.randn(vocab, generator=gen) * scale * 0.3 + offset
    bias[torch.randperm(vocab, generator=gen)[:minus_inf]] = float("-inf")
    targets = torch.multinomial(torch.isfinite(bias).double(), rows, replacement=True, generator=gen)
    return hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), bias.to(DEVICE, dtype), targets.to(DEVICE)


def with_grads(fn, inputs, weights):
    """``fn``'s ``(logp, entropy)`` and the gradients to hidden, weight, bias of
    ``sum(w_logp * logp)``, ``sum(w_H * entropy)`` and of their sum."""
    leaves = [t.detach().requires_grad_() for t in inputs[:3]]
    logp, ent = fn(*leaves, inputs[3])
    objectives = {"logp": (logp * weights[0].to(logp.dtype)).sum(), "entropy": (ent * weights[1].to(ent.dtype)).sum()}
    objectives["both"] = objectives["logp"] + objectives["entropy"]
    grads = {k: torch.autograd.grad(v, leaves, retain_graph=True) for k, v in objectives.items()}
    return logp, ent, grads


# id -> (make options, temperature)
CASES = {
    "v1000-tau0.7": (dict(), 0.7),
    "all-negative-some-minus-inf-tau1.3": (dict(offset=-200.0, scale=3.0, minus_inf=30, vocab=301), 1.3),
    "huge-peaked": (dict(scale=400.0, vocab=301), 0.9),
    "bf16": (dict(scale=4.0, dtype=torch.bfloat16, vocab=301), 1.0),
}


@pytest.mark.usefixtures("nan_empty")
@pytest.mark.parametrize("case", list(CASES))
@paths()
def test_logprobs_entropy_and_gradients_against_float64(path, case):
    options, temperature = CASES[case]
    inputs = make(**options)
    dtype = inputs[0].dtype
    gen = torch.Generator().manual_seed(1)
    weights = (torch.randn(inputs[3].shape, generator=gen).to(DEVICE),
               torch.randn(inputs[3].shape, generator=gen).to(DEVICE))
    before = [t.clone() for t in inputs]
    logp, ent, grads = with_grads(lambda h, w, b, y: logprobs_entropy(path, h, w, b, y, temperature), inputs, weights)
    gold_logp, gold_ent, gold_grads = with_grads(lambda h, w, b, y: materialised(h, w, b, y, temperature),
                                                 inputs, weights)
    own = with_grads(lambda h, w, b, y: materialised(h, w, b, y, temperature, dtype), inputs, weights)
    slack = 1.0 if dtype != torch.float32 and path.startswith("triton") and interpreting() else 0.0
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == inputs[3].shape
    check("logp", logp, gold_logp, own[0], dtype)
    check_entropy_part("entropy", ent, gold_ent, own[1], dtype)
    for objective, values in grads.items():
        judge = check if objective == "logp" else check_entropy_part
        for name, value, gold, native in zip(("dh", "dW", "dbias"), values, gold_grads[objective], own[2][objective]):
            assert value.dtype == dtype
            judge(f"{name} of {objective}", value, gold, native, dtype, slack)
    for t, b in zip(inputs, before):
        assert torch.equal(t, b), "an input was modified"


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter, on the NaN rows' forward
@paths()
def test_packed_equals_padded_and_the_mask_holds(path):
    """``[B, T, d]`` with a completion mask (NaN hidden states and -100 ids outside it) against
    the packed ``[N, d]`` of its masked positions: the same log-probs, entropies and gradients;
    exactly 0 and no gradient outside the mask."""
    batch, length = 3, 17
    hidden, weight, bias, targets = make(rows=batch * length, vocab=203)
    mask = torch.rand(batch, length, generator=torch.Generator().manual_seed(4)).to(DEVICE) < 0.6
    mask[1, :16] = False  # a whole interpreter row tile with no live row
    live = mask.reshape(-1)
    padded_hidden = torch.where(mask[..., None], hidden.view(batch, length, -1), float("nan"))
    padded_targets = torch.where(mask, targets.view(batch, length), -100)
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(batch, length, generator=gen).to(DEVICE) for _ in range(2)]
    logp, ent, grads = with_grads(lambda h, w, b, y: logprobs_entropy(path, h, w, b, y, 0.8, mask.int()),
                                  (padded_hidden, weight, bias, padded_targets), weights)
    packed_logp, packed_ent, packed_grads = with_grads(
        lambda h, w, b, y: logprobs_entropy(path, h, w, b, y, 0.8),
        (hidden[live], weight, bias, targets[live]), [w[mask] for w in weights])
    assert packed_logp.shape == (int(live.sum()),)
    for name, value in (("logp", logp), ("entropy", ent), ("dh", grads["both"][0])):
        assert torch.equal(value[~mask], torch.zeros_like(value[~mask])), f"{name} outside the mask"
    check("logp", logp[mask], packed_logp, None, torch.float32)
    check("entropy", ent[mask], packed_ent, None, torch.float32)
    for objective in grads:
        check(f"dh of {objective}", grads[objective][0][mask], packed_grads[objective][0], None, torch.float32)
        for name, value, gold in zip(("dW", "dbias"), grads[objective][1:], packed_grads[objective][1:]):
            check(f"{name} of {objective}", value, gold, None, torch.float32)


@paths("torch", "triton")
def test_no_entropy_gradient_asked_means_no_entropy_work(path, monkeypatch):
    """The backward launcher gets ``grad_entropy=None`` unless the entropy takes part in the
    differentiated objective (it is then the entropy's gradient, 0 outside the mask)."""
    seen = []
    launchers = linear_ops._launchers

    def spy(name):
        forward, backward = launchers(name)

        def recording(*args, grad_entropy=None, entropy=None):
            seen.append(grad_entropy)
            return backward(*args, grad_entropy=grad_entropy, entropy=entropy)
        return forward, recording

    monkeypatch.setattr(linear_ops, "_launchers", spy)
    hidden, weight, bias, targets = make(rows=9, vocab=101)
    mask = torch.arange(9, device=DEVICE) < 7
    hidden.requires_grad_()
    logp, ent = logprobs_entropy(path, hidden, weight, bias, targets, 1.0, mask)
    torch.autograd.grad(logp.sum() + ent.detach().sum(), hidden, retain_graph=True)
    assert seen.pop() is None
    torch.autograd.grad((logp + 2 * ent).sum(), hidden, retain_graph=True)
    assert torch.equal(seen.pop().cpu(), torch.where(mask, 2.0, 0.0).cpu()[torch.argsort(~mask.cpu(), stable=True)]
                       if path == "triton" else torch.where(mask, 2.0, 0.0).cpu())
    (dh,) = torch.autograd.grad(ent.sum(), hidden)
    assert seen.pop() is not None and torch.count_nonzero(dh[:7]) > 0


@paths()
def test_temperature_scaling_has_no_bias(path):
    """At ``|logits| ~ 1e3`` and ``tau = 0.9`` the mean signed fp32 log-prob error against
    float64 is no larger than that of PyTorch's fp32 ``log_softmax(z / tau)`` with ``z / tau``
    correctly rounded (plus three standard errors of the mean; PyTorch's own ``z / 0.9``
    multiplies by an fp32 reciprocal, biased itself).  Scaling by ``fp32(1 / tau)`` gives every
    log-prob the same relative bias, ``-4.8e-8 |logp|``: ~10 standard errors here."""
    hidden, weight, bias, targets = make(rows=256, dim=16, vocab=301, scale=1000.0, seed=3)
    gold, _ = materialised(hidden, weight, bias, targets, 0.9)
    with torch.no_grad():
        logp, _ = logprobs_entropy(path, hidden, weight, bias, targets, 0.9)
    scaled = ((hidden @ weight.T + bias).double() / 0.9).float()
    own = torch.log_softmax(scaled, -1).gather(1, targets[:, None])[:, 0]
    error, own_error = (logp.double() - gold), (own.double() - gold)
    bound = own_error.mean().abs() + 3 * error.std() / error.numel() ** 0.5
    assert error.mean().abs() <= bound, (
        f"mean signed log-prob error {float(error.mean()):.3g} > {float(bound):.3g} "
        f"(PyTorch fp32: {float(own_error.mean()):.3g}; mean |logp| {float(gold.abs().mean()):.3g})")


def test_compiles_fullgraph_and_matches_eager():
    """``torch.compile(fullgraph=True)`` (aot_eager: the custom ops are opaque either way) of a
    step using the entropy, and of one using only the log-probs, gives the eager gradients."""
    hidden, weight, bias, targets = make(rows=11, dim=8, vocab=37)
    mask = torch.arange(11, device=DEVICE) < 9
    leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
    for use_entropy in (True, False):
        def step(h, w, b):
            logp, ent = fused_linear_token_logprobs(h, w, targets, 0.8, bias=b, completion_mask=mask, backend="torch",
                                                    check_values=False, return_entropy=True)
            return (0.3 * logp).sum() + (ent.sum() if use_entropy else 0.0)
        eager = torch.autograd.grad(step(*leaves), leaves)
        compiled = torch.autograd.grad(torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves), leaves)
        for value, expected in zip(compiled, eager):
            torch.testing.assert_close(value, expected)
