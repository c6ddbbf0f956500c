"""The implementations the benchmarks compare, each with what it computes and when it runs.

Every implementation maps the same :class:`~lens_kernels.bench.problems.Inputs` to a 0-dim
loss; the benchmark differentiates it with respect to ``Impl.leaf(inputs)`` and compares
``Impl.logits_grad(grad)`` (always ``[B, T, V]``) with the float64 reference.  All of them use
the loss options of :meth:`Inputs.loss_kwargs`: on-policy (``old = logp.detach()``) or
off-policy (``old = inputs.old_logprobs``), temperature 1, ``eps_low = eps_high = 0.2``, no KL,
``seq-mean-token-mean``.

Liger-Kernel's ``triton_grpo_loss`` with ``loss_type="grpo"`` averages each row's masked
per-token losses over its completion tokens, then takes the mean over all ``B`` rows; our
``seq-mean-token-mean`` divides by the number of rows that have a completion token.  The two
agree when every row has one, which :func:`~lens_kernels.bench.problems.make_inputs`
guarantees, so the Liger rows are checked against the same float64 reference as ours.
"""
from __future__ import annotations

import importlib.util
import inspect
import shutil
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import lens_kernels as lk

from .. import reference
from ..backends import resolve
from ..config import LensOptions
from ..groups import GroupLayout
from .problems import Inputs

MODES = ("lens", "grpo")
LossFn = Callable[[Inputs], torch.Tensor]


@dataclass(frozen=True)
class Impl:
    """``build(mode)`` returns a fresh callable ``inputs -> loss`` (fresh so that a compiled
    implementation recompiles for each shape); ``unavailable(device)`` is None when it runs
    on ``device``, otherwise the reason it does not."""

    name: str
    computes: str
    build: Callable[[str], LossFn]
    unavailable: Callable[[torch.device], Optional[str]]
    modes: tuple[str, ...] = MODES
    grad_of_full: bool = False  # differentiates ``full [B, T+1, V]`` instead of ``logits``

    def skip_reason(self, device: torch.device, mode: str) -> Optional[str]:
        if mode not in self.modes:
            return f"{self.name} computes only mode(s) {list(self.modes)}"
        return self.unavailable(torch.device(device))

    def leaf(self, inputs: Inputs) -> torch.Tensor:
        return inputs.full if self.grad_of_full else inputs.logits

    def logits_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return grad[:, :-1] if self.grad_of_full else grad


FUSED_COMPUTES = (
    "lk.fused_lens_loss(backend={backend!r}, check_values=False), as a user on the fast path calls it: "
    "the LENS loss (lk.reference) in the given mode, confidences/difficulty/advantages included, from logits [B,T,V] "
    "(old_logprobs passed off-policy) with fp32 accumulation and no [B,T,V] fp32 buffer; one gradient "
    "in the logits' dtype. On the GPU backends one pass over the logits off-policy or in grpo mode, "
    "two for on-policy lens; masked rows not read"
)
REFERENCE_COMPUTES = (
    "lk.reference.token_logprobs(compute_dtype=float32) then lk.reference.epilogue (the body of "
    "lk.reference.fused_lens_loss in fp32, without its argument checks): the same loss in plain PyTorch, {how}; "
    "the float64 gold is not timed"
)
EAGER_HOW = "materialising fp32 log_softmax over [B,T,V], autograd backward"
COMPILED_HOW = (
    "under torch.compile (inductor, default mode, dynamic=False; compile time excluded): inductor fuses the "
    "vocabulary ops and chooses what to keep for the backward"
)
LIGER_CALL = (
    "liger_kernel triton_grpo_loss(old_logp=None on-policy or the old log-probs off-policy, loss_type='grpo', "
    "beta=0, eps 0.2/0.2, temperature 1, inplace=False, reduce=True) on the full [B,T+1,V] logits (last "
    "position unused; gradient w.r.t. [B,T+1,V], last position zero); its per-row mean then mean over all "
    "B rows equals loss_agg_mode='seq-mean-token-mean' when every row has a completion token (true here)"
)
LIGER_COMPUTES = (
    "GRPO advantages (r - mean_g) / (std_g + 1e-6) in PyTorch inside the timed call, then " + LIGER_CALL
)
LIGER_LENS_COMPUTES = (
    "the do-it-yourself LENS competitor, inside the timed call: lk.lens_advantages{checks} from the old "
    "log-probs (off-policy), or on-policy from the current ones computed first by Liger's "
    "fused_selective_log_softmax (no grad; one more pass over the live rows), then " + LIGER_CALL
)


def _fused(backend: str) -> Impl:
    def build(mode: str) -> LossFn:
        return lambda x: lk.fused_lens_loss(**x.loss_kwargs(), mode=mode, backend=backend, check_values=False).loss

    def unavailable(device: torch.device) -> Optional[str]:
        if backend == "triton" and device.type != "cuda":
            return ("the Triton backend needs a CUDA device to be timed (TRITON_INTERPRET=1 runs it on the CPU, "
                    "far too slowly)")
        if lk.is_available(backend, device):
            return None
        return f"the {backend} backend is not available on {device} (extension not built, or no CUDA device)"

    return Impl(f"fused-{backend}", FUSED_COMPUTES.format(backend=backend), build, unavailable)


def _reference_core(mode: str) -> Callable:
    options = LensOptions(mode=mode)

    def loss(logits, target_ids, mask, rewards, groups: GroupLayout, temperature: float,
             old: Optional[torch.Tensor]) -> torch.Tensor:
        logp = reference.token_logprobs(logits, target_ids, temperature, torch.float32)
        old = logp.detach() if old is None else old
        return reference.epilogue(logp, old, mask, rewards, groups, options).loss

    return loss


def _reference(core: Callable) -> LossFn:
    return lambda x: core(x.logits, x.target_ids, x.completion_mask, x.rewards, x.groups, x.temperature,
                          x.old_logprobs)


def _always(device: torch.device) -> Optional[str]:
    return None


def _eager(mode: str) -> LossFn:
    return _reference(_reference_core(mode))


def _compiled(mode: str) -> LossFn:
    torch._dynamo.reset()  # one shape per build: never hits the recompile limit, never falls back
    return _reference(torch.compile(_reference_core(mode), dynamic=False))


def _compile_unavailable(device: torch.device) -> Optional[str]:
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile's inductor needs triton for CUDA tensors"
    if device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
        return "torch.compile's inductor needs a C++ compiler for CPU tensors"
    return None


def _liger_loss(x: Inputs, advantages: torch.Tensor) -> torch.Tensor:
    """Liger's GRPO loss on ``x`` with the given ``[B]`` advantages (LIGER_CALL)."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    loss, _ = triton_grpo_loss(
        x.full, x.old_logprobs, None, x.target_ids, advantages, x.mask_float, temperature=x.temperature,
        beta=0.0, eps_low=0.2, eps_high=0.2, inplace=False, loss_type="grpo", reduce=True,
    )
    return loss


def _liger_grpo(mode: str) -> LossFn:
    def run(x: Inputs) -> torch.Tensor:
        r = x.rewards.view(-1, x.shape.group_size)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).reshape(-1)
        return _liger_loss(x, adv)

    return run


# Value checks off in lk.lens_advantages where it offers the switch (a user on the fast path).
_ADVANTAGE_CHECKS = (
    {"check_values": False} if "check_values" in inspect.signature(lk.lens_advantages).parameters else {}
)


def _liger_lens(mode: str) -> LossFn:
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

    def run(x: Inputs) -> torch.Tensor:
        old = x.old_logprobs
        if old is None:
            old = fused_selective_log_softmax(x.full.detach(), x.target_ids, x.temperature, x.mask_float)
        adv = lk.lens_advantages(old, x.completion_mask, x.rewards, group_size=x.shape.group_size, mode=mode,
                                 **_ADVANTAGE_CHECKS).advantages
        return _liger_loss(x, adv)

    return run


def _liger_unavailable(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'lens-kernels[bench]')"
    if device.type != "cuda":
        return "Liger-Kernel's GRPO loss is a Triton kernel: it needs a CUDA device"
    try:
        importlib.import_module("liger_kernel.transformers.grpo_loss")
    except ImportError as err:
        return f"liger_kernel.transformers.grpo_loss does not import: {err}"
    return None


def _checks_text() -> str:
    return "(check_values=False)" if _ADVANTAGE_CHECKS else " (its value checks on: it has no switch)"


def _registry() -> dict[str, Impl]:
    impls = [_fused(name) for name in ("triton", "cuda", "torch")]
    impls += [
        Impl("reference-eager", REFERENCE_COMPUTES.format(how=EAGER_HOW), _eager, _always),
        Impl("reference-compiled", REFERENCE_COMPUTES.format(how=COMPILED_HOW), _compiled, _compile_unavailable),
        Impl("liger-grpo", LIGER_COMPUTES, _liger_grpo, _liger_unavailable, modes=("grpo",), grad_of_full=True),
        Impl("liger-lens", LIGER_LENS_COMPUTES.format(checks=_checks_text()), _liger_lens, _liger_unavailable,
             modes=("lens",), grad_of_full=True),
    ]
    return {impl.name: impl for impl in impls}


REGISTRY: dict[str, Impl] = _registry()


def fused_auto(device: torch.device) -> str:
    """The registry name of the backend ``backend="auto"`` picks on ``device``."""
    return f"fused-{resolve('auto', torch.device(device))}"


def select(names: Optional[list[str]], device: torch.device) -> list[Impl]:
    """The implementations named (``"fused"`` means the auto backend), or all of them."""
    if not names:
        return list(REGISTRY.values())
    chosen = []
    for name in names:
        name = fused_auto(device) if name == "fused" else name
        if name not in REGISTRY:
            raise ValueError(f"--impl: unknown implementation {name!r}; known: {['fused', *REGISTRY]}")
        chosen.append(REGISTRY[name])
    return chosen
