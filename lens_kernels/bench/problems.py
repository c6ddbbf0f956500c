"""Benchmark shapes and the synthetic inputs every implementation receives.

A shape is ``B`` rows of ``T`` positions over a vocabulary ``V`` in one logits dtype, grouped
by ``G``.  Inputs are built directly on the benchmark device in bounded chunks (no host copy,
no ``[B, T, V]`` fp32 temporary), and laid out as a trainer would have them: the model output
``full [B, T + 1, V]`` is contiguous and the loss reads the view ``full[:, :-1]``.  Liger's
GRPO loss takes ``full`` itself (it drops the last position), so every implementation reads
the same storage.

A problem is on-policy (``old_logprobs`` None: the loss uses the detached current log-probs)
or off-policy (:func:`off_policy_logprobs`: the policy's own float64 log-probs plus Gaussian
noise, so that some tokens clip).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..groups import GroupLayout, contiguous_groups
from ..testing import group_rewards

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# Vocabulary sizes of real model families (issue 3, item 3).
MODEL_VOCABS = {"qwen2.5": 151936, "llama-3.1": 128256, "llama-2/mistral": 32000}
MAX_LENGTH = 4096
# Bound on the fp32 temporaries of one generation chunk.
CHUNK_BYTES = 256 * 2**20
POLICIES = ("on", "off")
# Off-policy: old = logp + N(0, OFF_POLICY_NOISE^2), so ratio = exp(-noise) leaves [0.8, 1.2]
# for about 18% of the tokens (about half of those clip, depending on the advantage's sign).
OFF_POLICY_NOISE = 0.15
# No token's log-ratio lies within CLIP_MARGIN of a clip edge: the float64 gate and a kernel
# computing log-probs in fp32 (errors ~1e-5) then always agree on which tokens clip.
CLIP_MARGIN = 1e-3


@dataclass(frozen=True)
class Shape:
    """``batch`` rows (``batch / group_size`` prompts) of ``length`` tokens over ``vocab``."""

    batch: int
    length: int
    vocab: int
    group_size: int
    dtype: torch.dtype

    @property
    def tokens(self) -> int:
        return self.batch * self.length

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def logits_bytes(self) -> int:
        return self.tokens * self.vocab * self.dtype.itemsize

    @property
    def label(self) -> str:
        return f"V={self.vocab} N={self.tokens} ({self.batch}x{self.length}, G={self.group_size}) {self.dtype_name}"

    def as_dict(self) -> dict:
        return dict(batch=self.batch, length=self.length, vocab=self.vocab, group_size=self.group_size,
                    tokens=self.tokens, dtype=self.dtype_name)


def shape_for_tokens(tokens: int, vocab: int, dtype: torch.dtype, group_size: int = 16,
                     rows: Optional[int] = None) -> Shape:
    """``tokens = B * T`` split as ``B = rows`` (default two groups, more once ``T`` would pass
    ``MAX_LENGTH``), ``T = tokens / B``."""
    if rows is None:
        rows = 2 * group_size
        while tokens // rows > MAX_LENGTH:
            rows += group_size
    if rows % group_size or tokens % rows:
        raise ValueError(f"tokens={tokens} is not a multiple of rows={rows}, or rows of group_size={group_size}")
    return Shape(rows, tokens // rows, vocab, group_size, dtype)


def sweep(vocabs, token_counts, dtypes, group_size: int = 16, rows: Optional[int] = None) -> list[Shape]:
    """Every (dtype, vocab, tokens) combination, smallest problems first within a vocabulary."""
    return [
        shape_for_tokens(n, v, d, group_size, rows)
        for d in dtypes for v in vocabs for n in sorted(token_counts)
    ]


@dataclass
class Inputs:
    """One copy of a problem.  ``logits`` and ``full`` are leaves requiring grad that share
    storage: ``logits`` is ``full[:, :-1]`` (what ``lens_kernels`` and the reference read)."""

    shape: Shape
    full: torch.Tensor  # [B, T + 1, V] contiguous
    logits: torch.Tensor  # [B, T, V] view of full
    target_ids: torch.Tensor  # [B, T] int64
    completion_mask: torch.Tensor  # [B, T] bool
    mask_float: torch.Tensor  # [B, T] fp32 (Liger's mask)
    rewards: torch.Tensor  # [B] fp32 in {0, 1}
    groups: GroupLayout  # contiguous groups of group_size rows
    temperature: float = 1.0
    old_logprobs: Optional[torch.Tensor] = None  # [B, T] fp32 off-policy, None on-policy

    @property
    def policy(self) -> str:
        """``"on"`` (old log-probs = the detached current ones) or ``"off"``."""
        return "on" if self.old_logprobs is None else "off"

    @property
    def live_positions(self) -> int:
        """Positions whose completion mask is 1 (rows a mask-skipping kernel reads)."""
        return int(self.completion_mask.sum())

    def loss_kwargs(self, logits: Optional[torch.Tensor] = None) -> dict:
        """Keyword arguments of ``fused_lens_loss`` (defaults for everything else:
        ``seq-mean-token-mean``, ``eps = 0.2``, no KL); ``old_logprobs`` only off-policy."""
        kwargs = dict(
            logits=self.logits if logits is None else logits,
            target_ids=self.target_ids,
            completion_mask=self.completion_mask,
            rewards=self.rewards,
            group_size=self.shape.group_size,
            temperature=self.temperature,
        )
        if self.old_logprobs is not None:
            kwargs["old_logprobs"] = self.old_logprobs
        return kwargs

    def copy(self) -> "Inputs":
        """Same values in new logits storage (for rotating inputs between timed runs)."""
        return _with_full(self, self.full.detach().clone())

    @property
    def device(self) -> torch.device:
        return self.full.device


def _with_full(inputs: Inputs, full: torch.Tensor) -> Inputs:
    full.requires_grad_(True)
    logits = full.detach()[:, :-1].requires_grad_(True)
    return replace(inputs, full=full, logits=logits)


def _row_chunks(rows: int, vocab: int):
    step = max(1, CHUNK_BYTES // (4 * vocab))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def make_inputs(shape: Shape, device: torch.device, seed: int = 0, logit_scale: float = 3.0) -> Inputs:
    """A rollout-like batch: Gaussian logits, targets sampled from the policy itself (so
    confidences are realistic), a prompt prefix and a random completion end per row, and
    rewards cycling through negative, mixed and all-correct groups."""
    device = torch.device(device)
    batch, length, vocab = shape.batch, shape.length, shape.vocab
    gen = torch.Generator(device=device).manual_seed(seed)
    full = torch.empty((batch, length + 1, vocab), dtype=shape.dtype, device=device)
    flat = full.view(-1, vocab)
    for rows in _row_chunks(flat.shape[0], vocab):
        noise = torch.randn((rows.stop - rows.start, vocab), generator=gen, device=device)
        flat[rows] = noise.mul_(logit_scale).to(shape.dtype)
    targets = torch.empty((batch, length), dtype=torch.int64, device=device)
    for b in range(batch):
        for cols in _row_chunks(length, vocab):
            probs = torch.softmax(full[b, cols].float(), -1)
            targets[b, cols] = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    host = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, max(1, length // 3), (batch, 1), generator=host)
    end = torch.randint(length // 2, length + 1, (batch, 1), generator=host)
    positions = torch.arange(length).unsqueeze(0)
    mask = (positions >= prompt) & (positions < torch.maximum(end, prompt + 1))
    rewards = group_rewards(batch // shape.group_size, shape.group_size, host)
    inputs = Inputs(
        shape=shape, full=full, logits=full, target_ids=targets,
        completion_mask=mask.to(device), mask_float=mask.float().to(device), rewards=rewards.to(device),
        groups=contiguous_groups(batch, shape.group_size).tensors(device),
    )
    return _with_full(inputs, full)


def off_policy_logprobs(logp: torch.Tensor, mask: torch.Tensor, seed: int = 0, eps_low: float = 0.2,
                        eps_high: float = 0.2, noise: float = OFF_POLICY_NOISE) -> torch.Tensor:
    """``old [B, T]`` fp32 for an off-policy problem: the policy's exact (float64) log-probs
    ``logp`` plus Gaussian noise, at most 0 (a log-prob; the loss's value checks refuse
    positive ones) and 0 at masked-out positions.  The log-ratio ``logp - old`` of every token
    stays :data:`CLIP_MARGIN` away from the clip edges ``log(1 - eps_low)`` and
    ``log(1 + eps_high)``."""
    gen = torch.Generator(device=logp.device).manual_seed(seed + 1)
    logp = logp.detach()
    shift = noise * torch.randn(logp.shape, generator=gen, device=logp.device, dtype=torch.float64)
    shift = torch.minimum(shift, -logp)  # old = logp + shift <= 0
    for edge in (-math.log1p(eps_high), -math.log1p(-eps_low)):  # shift = -log-ratio at the edges
        near = (shift - edge).abs() < CLIP_MARGIN
        up = (shift >= edge) & (logp + edge + CLIP_MARGIN <= 0)  # away from the edge, but never above 0
        shift = torch.where(near, torch.where(up, edge + CLIP_MARGIN, edge - CLIP_MARGIN), shift)
    return torch.where(mask.bool(), logp + shift, 0).float()
