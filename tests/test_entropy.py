"""Token entropy beside the log-probs (``token_logprobs(..., return_entropy=True)``), and packed
``[N, V]`` logits, on every kernel backend against the float64 reference.

The ops are called directly (``ops.token_logprobs``) so that the cuda backend runs too, through
the host emulation of csrc/ where no GPU is; the public function's validation is at the end.
"""
from __future__ import annotations

import pytest
import torch

import lens_kernels as lk
from lens_kernels import backends, ops, reference
from lens_kernels.config import LensOptions

from .conftest import DEVICE, interpreting
from .kernel_backends import kernel_backend  # noqa: F401  (fixture)
from .tolerances import check

# id -> ([B, T, V], dtype, temperature).  V = 4099 gives Triton two chunks of 4096 (the max of one
# row sits in the second); V = 37 is one short chunk.
CASES = {
    "v1000-fp32-t0.7": ((3, 5, 1000), torch.float32, 0.7),
    "v4099-fp32-t1.0": ((2, 3, 4099), torch.float32, 1.0),
    "v37-bf16-t1.3": ((3, 5, 37), torch.bfloat16, 1.3),
}
LOSSES = ("both", "logp", "entropy")


def make_inputs(shape, dtype, device, seed=0):
    """Strided logits ``full[:, :-1]`` with special rows (flat index): 0 all negative (around
    -80), 1 -inf at every third entry, 2 its max in the last entries (Triton's second chunk),
    3 -inf over all but the last 5 entries; targets at finite entries."""
    batch, length, vocab = shape
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(batch, length + 1, vocab, generator=gen) * 3
    rows = full[:, :-1].reshape(-1, vocab)  # a copy: written back below
    rows[0] -= 80
    rows[1, ::3] = float("-inf")
    rows[2, -2] = 25.0
    rows[3, :-5] = float("-inf")
    full[:, :-1] = rows.view(batch, length, vocab)
    target = torch.randint(0, vocab, (batch, length), generator=gen).view(-1)
    target[1] = 1 + 3 * (target[1] // 3) if 1 + 3 * (target[1] // 3) < vocab else 1
    target[3] = vocab - 1
    return full.to(device, dtype)[:, :-1], target.view(batch, length).to(device)


def _losses(logp, ent, a, b):
    return {"both": (logp * a).sum() + (ent * b).sum(), "logp": (logp * a).sum(), "entropy": (ent * b).sum()}


def _grads(leaf, logp, ent, a, b):
    losses = _losses(logp, ent, a.to(logp.dtype), b.to(logp.dtype))
    return {k: torch.autograd.grad(v, leaf, retain_graph=True)[0] for k, v in losses.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_logprobs_and_entropy_match_float64(kernel_backend, case):
    """``logp``, ``entropy`` and the gradient of ``a . logp + b . entropy`` (both, each alone)
    against float64; bf16 against PyTorch's own bf16 error."""
    name, device = kernel_backend
    shape, dtype, temperature = CASES[case]
    logits, target = make_inputs(shape, dtype, device)
    before = logits.clone()
    leaf = logits.detach().requires_grad_()
    logp, ent = ops.token_logprobs(leaf, target, LensOptions(temperature=temperature, backend=name), entropy=True)
    assert logp.dtype == ent.dtype == torch.float32 and ent.shape == logp.shape == shape[:2]

    gold_leaf = logits.detach().double().requires_grad_()
    gold = reference.token_logprobs(gold_leaf, target, temperature, return_entropy=True)
    native_leaf = logits.detach().requires_grad_()
    native = reference.token_logprobs(native_leaf, target, temperature, dtype, return_entropy=True)
    slack = 1.0 if name == "triton" and interpreting() else 0.0  # the interpreter truncates fp32 -> bf16
    check("logp", logp, gold[0], native[0], dtype)
    check("entropy", ent, gold[1], native[1], dtype)

    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(shape[:2], generator=gen).to(device), torch.randn(shape[:2], generator=gen).to(device)
    ours, golds, natives = (_grads(leaf, logp, ent, a, b), _grads(gold_leaf, *gold, a, b),
                            _grads(native_leaf, *native, a, b))
    for loss in LOSSES:
        check(f"grad ({loss})", ours[loss], golds[loss], natives[loss], dtype, ulp_slack=slack)
    assert torch.equal(logits, before), "logits were modified"


@pytest.mark.parametrize("scale", [1e3, 1e4], ids=["1e3", "1e4"])
def test_extreme_rows(kernel_backend, scale):
    """Huge logits (fp32, t = 0.7): every output and gradient as close to float64 as PyTorch's
    own fp32; a single finite logit gives entropy 0 and no entropy gradient; no NaN."""
    name, device = kernel_backend
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 6, 301, generator=gen) * scale
    logits[0, 1, 7] = 5 * scale  # near one-hot
    logits[0, 2] = float("-inf")
    logits[0, 2, 40] = 0.5 * scale  # a single finite logit
    logits[0, 3, 100:] = float("-inf")
    target = torch.tensor([[3, 7, 40, 11, 200, 0]])
    logits, target = logits.to(device), target.to(device)
    leaf = logits.detach().requires_grad_()
    logp, ent = ops.token_logprobs(leaf, target, LensOptions(temperature=0.7, backend=name), entropy=True)
    gold_leaf = logits.detach().double().requires_grad_()
    gold = reference.token_logprobs(gold_leaf, target, 0.7, return_entropy=True)
    native_leaf = logits.detach().requires_grad_()
    native = reference.token_logprobs(native_leaf, target, 0.7, torch.float32, return_entropy=True)
    assert float(ent[0, 2]) == 0.0 and float(logp[0, 2]) == 0.0
    # Judged like a narrow dtype: no worse than PyTorch's own fp32 against float64.
    check("logp", logp, gold[0], native[0], torch.bfloat16)
    check("entropy", ent, gold[1], native[1], torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 6, generator=gen).to(device), torch.randn(1, 6, generator=gen).to(device)
    ours, golds, natives = (_grads(leaf, logp, ent, a, b), _grads(gold_leaf, *gold, a, b),
                            _grads(native_leaf, *native, a, b))
    for loss in LOSSES:
        check(f"grad ({loss})", ours[loss], golds[loss], natives[loss], torch.bfloat16)
    assert not ours["entropy"][0, 2].any(), "a one-hot row's entropy has no gradient"


def test_saved_logsumexp_keeps_near_certain_gradients(kernel_backend):
    """The forward's float64 ``lse`` (max and log-sum parts, exactly) lets the backward keep
    ``p`` of near-certain tokens at |z| ~ 1e3 (top logit 1000, runner-up 8 to 10 below: log s
    ~ 5e-4), which the logsumexp rounded to fp32 (last place 6e-5) blurs: at least 100 times
    closer to float64 than from that fp32 logsumexp."""
    name, device = kernel_backend
    gen = torch.Generator().manual_seed(5)
    logits = 1000 - 20 - 50 * torch.rand(12, 301, generator=gen)
    logits[:, 0] = 1000.0
    logits[:, 1] = 1000 - torch.linspace(8, 10, 12)
    logits = logits.view(2, 6, 301)
    target = torch.tensor([[0, 1] * 3] * 2)
    g = torch.randn(2, 6, generator=gen)
    leaf = logits.double().requires_grad_()
    (gold,) = torch.autograd.grad((reference.token_logprobs(leaf, target) * g).sum(), leaf)
    kernels = backends.get(name)
    logits, target, g = logits.to(device), target.to(device), g.to(device)
    _, lse, _ = kernels.logprobs_forward(logits, target, 1.0)
    assert lse.dtype == torch.float64
    exact = kernels.logprobs_backward(g, logits, target, lse, 1.0, False)
    rounded = kernels.logprobs_backward(g, logits, target, lse.float(), 1.0, False)
    error = lambda grad: float((grad.cpu().double() - gold).abs().max())  # noqa: E731
    assert error(exact) * 100 <= error(rounded), f"{name}: {error(exact):.3g} vs {error(rounded):.3g} from an fp32 lse"


def test_packed_equals_padded(kernel_backend):
    """``[N, V]`` logits with ``[N]`` targets give exactly the ``[B, T, V]`` results, outputs and
    gradients laid out like the input."""
    name, device = kernel_backend
    logits, target = make_inputs((2, 3, 203), torch.float32, device, seed=4)
    logits = logits.contiguous()  # both layouts view the same rows (csrc's vector path depends on addresses)
    options = LensOptions(temperature=0.8, backend=name)
    a, b = torch.randn(2, 3).to(device), torch.randn(2, 3).to(device)
    padded_leaf = logits.detach().requires_grad_()
    packed_leaf = logits.detach().view(6, 203).requires_grad_()
    padded = ops.token_logprobs(padded_leaf, target, options, entropy=True)
    packed = ops.token_logprobs(packed_leaf, target.reshape(6), options, entropy=True)
    assert packed[0].shape == packed[1].shape == (6,)
    for got, want in zip(packed, padded):
        assert torch.equal(got, want.reshape(6))
    (padded_grad,) = torch.autograd.grad(_losses(*padded, a, b)["both"], padded_leaf)
    (packed_grad,) = torch.autograd.grad(_losses(*packed, a.reshape(6), b.reshape(6))["both"], packed_leaf)
    assert packed_grad.shape == (6, 203) and torch.equal(packed_grad, padded_grad.reshape(6, 203))


def test_entropy_gradient_costs_nothing_unless_asked(monkeypatch):
    """The backward receives ``grad_entropy=None`` (the log-prob-only kernel) when no gradient
    reaches the entropy, and zeros for ``grad_logp`` when only the entropy is differentiated."""
    calls = []
    module = backends.get("torch")
    original = module.logprobs_backward

    def spy(grad_logp, *args, **kwargs):
        calls.append((grad_logp.clone(), kwargs.get("grad_entropy", args[6] if len(args) > 6 else None)))
        return original(grad_logp, *args, **kwargs)

    monkeypatch.setattr(module, "logprobs_backward", spy)
    logits = torch.randn(2, 3, 11, requires_grad=True)
    target = torch.randint(0, 11, (2, 3))
    logp, ent = lk.token_logprobs(logits, target, backend="torch", return_entropy=True)
    logp.sum().backward(retain_graph=True)
    assert calls[-1][1] is None
    ent.sum().backward()
    assert calls[-1][1] is not None and not calls[-1][0].any()


def test_gradcheck_entropy_float64():
    logits = torch.randn(2, 3, 11, dtype=torch.float64)
    logits[0, 1, :4] = float("-inf")
    logits.requires_grad_()
    target = torch.randint(4, 11, (2, 3))
    assert torch.autograd.gradcheck(
        lambda x: lk.token_logprobs(x, target, temperature=1.3, backend="torch", return_entropy=True), (logits,)
    )


@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "logp+entropy"])
def test_custom_ops_pass_opcheck(entropy):
    """Schemas, fake kernels and autograd registration of the vocabulary-pass ops."""
    logits = torch.randn(2, 3, 11, requires_grad=True)
    target = torch.randint(0, 11, (2, 3))
    torch.library.opcheck(ops._logprobs_fwd, (logits, target, 1 / 0.7, "torch", False, entropy))
    logp, lse, ent = ops._logprobs_fwd(logits.detach(), target, 1 / 0.7, "torch", False, True)
    grads = (torch.randn(2, 3), ent) if entropy else (None, None)
    torch.library.opcheck(ops._logprobs_bwd, (torch.randn(2, 3), logits.detach(), target, lse, 1 / 0.7, "torch",
                                              None, *grads))


def test_token_logprobs_with_entropy_compiles_fullgraph():
    torch._dynamo.reset()
    logits = torch.randn(5, 37, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 37, (5,), device=DEVICE)

    def step(x):
        logp, ent = lk.token_logprobs(x, target, temperature=0.7, backend="torch", return_entropy=True)
        return logp.sum() + 0.1 * ent.sum()

    eager = torch.autograd.grad(step(logits), logits)[0]
    compiled = torch.autograd.grad(torch.compile(step, fullgraph=True, backend="aot_eager")(logits), logits)[0]
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize(
    "logits_shape, target_shape, match",
    [
        ((7,), (7,), r"logits: expected shape \[B, T, V\] or packed \[N, V\]"),
        ((6, 11), (2, 3), r"target_ids: expected shape \[N\] = \[6\] for packed logits \[N, V\]"),
        ((2, 3, 11), (6,), r"target_ids: expected shape \[2, 3\]"),
    ],
    ids=["1-d-logits", "packed-logits-padded-targets", "padded-logits-packed-targets"],
)
def test_packed_shapes_are_validated(logits_shape, target_shape, match):
    with pytest.raises(ValueError, match=match):
        lk.token_logprobs(torch.randn(*logits_shape), torch.zeros(target_shape, dtype=torch.int64))


def test_return_entropy_must_be_a_bool():
    with pytest.raises(ValueError, match="return_entropy: expected True or False"):
        lk.token_logprobs(torch.randn(4, 5), torch.zeros(4, dtype=torch.int64), return_entropy="yes")
