"""The lm_head + loss benchmark rows: inputs ``hidden [B, T, d]`` and ``weight [V, d]`` and the
implementations compared on them (issue 9).

Every implementation maps a :class:`LinearInputs` to a 0-dim loss, differentiable in
``hidden`` and ``weight``; all use the same options: on-policy (``old = logp.detach()``) or
off-policy (``old = inputs.old_logprobs``), temperature 1, ``eps = 0.2``, no KL,
``seq-mean-token-mean``.  ``scripts/gpu_linear_bench.py`` checks and times them.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import lens_kernels as lk

from ..testing import group_rewards

LossFn = Callable[["LinearInputs"], torch.Tensor]


@dataclass
class LinearInputs:
    """One problem: ``hidden`` and ``weight`` are leaves requiring grad."""

    hidden: torch.Tensor  # [B, T, d]
    weight: torch.Tensor  # [V, d]
    target_ids: torch.Tensor  # [B, T] int64
    completion_mask: torch.Tensor  # [B, T] bool
    rewards: torch.Tensor  # [B] fp32 in {0, 1}
    group_size: int
    old_logprobs: Optional[torch.Tensor] = None  # [B, T] fp32, off-policy problems only

    def loss_kwargs(self) -> dict:
        return dict(target_ids=self.target_ids, completion_mask=self.completion_mask, rewards=self.rewards,
                    group_size=self.group_size, old_logprobs=self.old_logprobs)

    @property
    def policy(self) -> str:
        return "on" if self.old_logprobs is None else "off"

    @property
    def dims(self) -> tuple[int, int, int]:
        """``(N, d, V)``."""
        return self.target_ids.numel(), self.hidden.shape[-1], self.weight.shape[0]


def make_linear_inputs(tokens: int, dim: int, vocab: int, dtype: torch.dtype, device, length: int = 512,
                       group_size: int = 8, seed: int = 0, policy: str = "on") -> LinearInputs:
    """``tokens = B * T`` rows (``T = length``): Gaussian hidden states and a weight scaled so
    that the logits spread about 3 (like a trained model's), uniformly random targets, a prompt
    prefix and a random completion end per row, rewards cycling through negative, mixed and
    all-correct groups (so GRPO gives some groups zero advantage, as in real batches).
    ``policy="off"``: ``old_logprobs`` are the policy's own log-probs plus N(0, 0.1) noise
    (a sampler a little behind the learner; some tokens clip)."""
    batch = tokens // length
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn((batch, length, dim), generator=gen, device=device, dtype=dtype)
    weight = torch.randn((vocab, dim), generator=gen, device=device, dtype=dtype).mul_(3.0 / dim**0.5)
    host = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (batch, length), generator=host)
    prompt = torch.randint(0, length // 3, (batch, 1), generator=host)
    end = torch.randint(length // 2, length + 1, (batch, 1), generator=host)
    positions = torch.arange(length)
    mask = (positions >= prompt) & (positions < torch.maximum(end, prompt + 1))
    rewards = group_rewards(batch // group_size, group_size, host)
    old = None
    if policy == "off":
        with torch.no_grad():
            logp = lk.fused_linear_token_logprobs(hidden, weight, targets.to(device), check_values=False)
        old = (logp + 0.1 * torch.randn(logp.shape, generator=gen, device=device)).clamp(max=0.0)
    return LinearInputs(hidden.requires_grad_(), weight.requires_grad_(), targets.to(device), mask.to(device),
                        rewards.to(device), group_size, old)


@dataclass(frozen=True)
class LinearImpl:
    name: str
    computes: str
    build: Callable[[str], LossFn]
    unavailable: Callable[[torch.device], Optional[str]]
    modes: tuple[str, ...] = ("lens", "grpo")
    gemm_count: int = 3  # N x V x d GEMMs per fwd+bwd (2 N V d FLOPs each), every row

    def gemm_rows(self, mode: str, policy: str) -> tuple[str, ...]:
        """The rows each GEMM of one fwd+bwd runs over: ``"all"``; ``"live"``, the row tiles
        with a completion token once those rows are packed first; ``"grad"``, the tiles with a
        nonzero coefficient once those are packed first (the Triton one pass); ``"grad-live"``,
        the tiles with a nonzero gradient in the live-first order (the Triton tiles' backward)."""
        one_pass = fused_linear_one_pass(mode, policy)
        if self.name in ("fused-linear-library", "fused-linear-cuda") or (
                self.name == "fused-linear-triton" and one_pass):
            return ("all",) * (3 if one_pass else 4)
        if self.name in ("fused-linear-triton", "fused-linear-triton-gemm"):
            return ("live", "grad", "grad") if one_pass else ("live",) + ("grad-live",) * 3
        return ("all",) * self.gemm_count

    def gemms(self, mode: str, policy: str) -> int:
        """The GEMMs of one fwd+bwd on this problem, before any row skipping."""
        return len(self.gemm_rows(mode, policy))


def fused_linear_one_pass(mode: str, policy: str) -> bool:
    """Whether ``fused_linear_lens_loss`` takes its one-pass path (3 GEMMs) on this problem."""
    return mode == "grpo" or policy == "off"


def _fused_linear(gemm: str, backend: str = "triton") -> Callable[[str], LossFn]:
    def build(mode: str) -> LossFn:
        return lambda x: lk.fused_linear_lens_loss(x.hidden, x.weight, **x.loss_kwargs(), mode=mode, backend=backend,
                                                   check_values=False, gemm=gemm).loss
    return build


def _matmul_fused(mode: str) -> LossFn:
    def run(x: LinearInputs) -> torch.Tensor:
        logits = x.hidden @ x.weight.T
        return lk.fused_lens_loss(logits, **x.loss_kwargs(), mode=mode, check_values=False).loss
    return run


def _grpo_advantages(x: LinearInputs) -> torch.Tensor:
    r = x.rewards.view(-1, x.group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).reshape(-1)


def _surrogate(logp: torch.Tensor, x: LinearInputs) -> torch.Tensor:
    """GRPO clipped surrogate (old = ``x.old_logprobs``, or on-policy), seq-mean-token-mean, in PyTorch."""
    adv = _grpo_advantages(x)[:, None]
    ratio = torch.exp(logp - (logp.detach() if x.old_logprobs is None else x.old_logprobs))
    pg = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    mask = x.completion_mask.to(pg.dtype)
    per_row = (pg * mask).sum(1) / mask.sum(1).clamp(min=1)
    rows = (mask.sum(1) > 0).to(pg.dtype)
    return (per_row * rows).sum() / rows.sum().clamp(min=1)


def _liger(mode: str) -> LossFn:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo", chunk_size=4,
                                       epsilon_low=0.2, epsilon_high=0.2, temperature=1.0)

    def run(x: LinearInputs) -> torch.Tensor:
        out = loss_fn(x.hidden, x.weight, x.target_ids, x.completion_mask.float(), _grpo_advantages(x),
                      old_per_token_logps=x.old_logprobs)
        return out[0] if isinstance(out, tuple) else out
    return run


def _cce(mode: str) -> LossFn:
    from cut_cross_entropy import linear_cross_entropy

    def run(x: LinearInputs) -> torch.Tensor:
        targets = torch.where(x.completion_mask, x.target_ids, -100)
        nll = linear_cross_entropy(x.hidden, x.weight, targets, reduction="none")
        return _surrogate(-nll.float(), x)
    return run


def _needs(module: str, device: torch.device, package: str) -> Optional[str]:
    if device.type != "cuda":
        return f"{package} runs Triton kernels: it needs a CUDA device"
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return f"{package} is not installed"
    try:
        importlib.import_module(module)
    except Exception as err:  # an installed package that does not import is a reason, not a crash
        return f"{module} does not import: {type(err).__name__}: {err}"
    return None


def _triton_unavailable(device: torch.device) -> Optional[str]:
    return None if lk.is_available("triton", device) else "the Triton backend needs a CUDA device"


def _cuda_unavailable(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "the cuda backend needs a CUDA device"
    return None if lk.is_available("cuda", device) else "the cuda backend's library (csrc/) is not built"


LINEAR_IMPLS = {
    impl.name: impl for impl in (
        LinearImpl("fused-linear-triton",
                   "lk.fused_linear_lens_loss(backend='triton'): one pass when the coefficients are known "
                   "(grpo, or off-policy): row blocks of logits by cuBLAS, the loss kernel writes dZ in place, "
                   "dh/dW GEMMs in the forward (3 GEMMs, every row); on-policy lens: Triton logit tiles, never "
                   "stored, recomputed in the backward (4 GEMMs; row tiles without a completion token skipped in "
                   "the first, zero-gradient row blocks in the other 3)",
                   _fused_linear("auto"), _triton_unavailable),
        LinearImpl("fused-linear-library",
                   "lk.fused_linear_lens_loss(backend='triton', gemm='library'): the one-pass path where it "
                   "applies; on-policy lens: cuBLAS row blocks for the forward and again in the backward "
                   "(4 GEMMs, every row), Triton row kernels between them",
                   _fused_linear("library"), _triton_unavailable),
        LinearImpl("fused-linear-triton-gemm",
                   "lk.fused_linear_lens_loss(backend='triton', gemm='triton'): one pass where it applies with "
                   "Triton block GEMMs that skip row tiles without a completion token (logits) or without a "
                   "nonzero coefficient (dh, dW); on-policy lens: the Triton logit tiles, as fused-linear-triton",
                   _fused_linear("triton"), _triton_unavailable),
        LinearImpl("fused-linear-cuda",
                   "lk.fused_linear_lens_loss(backend='cuda'): as fused-linear-library, with the csrc/ row "
                   "kernels between the cuBLAS GEMMs",
                   _fused_linear("auto", "cuda"), _cuda_unavailable),
        LinearImpl("matmul+fused", "hidden @ weight.T (cuBLAS, [B,T,V] logits in the inputs' dtype) then "
                   "lk.fused_lens_loss (auto backend); autograd does the two backward GEMMs",
                   _matmul_fused, lambda device: None),
        LinearImpl("liger-fused-linear-grpo", "Liger LigerFusedLinearGRPOLoss(loss_type='grpo', beta=0, "
                   "chunk_size=4, compiled) with GRPO advantages computed in PyTorch",
                   _liger, lambda device: _needs("liger_kernel.chunked_loss", device, "liger-kernel"),
                   modes=("grpo",)),
        LinearImpl("cut-cross-entropy", "cut_cross_entropy.linear_cross_entropy(reduction='none', default "
                   "gradient filter) as -logp, then the on-policy GRPO surrogate in PyTorch",
                   _cce, lambda device: _needs("cut_cross_entropy", device, "cut-cross-entropy"),
                   modes=("grpo",), gemm_count=4),
    )
}
