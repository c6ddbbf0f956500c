"""The Triton backend's launch sequences at production shapes, on ``meta`` tensors.

Each case calls the launch sequences one level below the custom ops (a custom op on ``meta``
tensors would run its fake kernel): ``kernel_loss.one_pass`` / ``two_pass`` and the backward
the autograd functions run, ``scale_rows_``, the fused-linear tiles (forward, backward), the
one pass with Triton and with library GEMMs, and the library row blocks with the Triton row
kernels.  The options of the cases are chosen so that every constexpr switch of every kernel
takes each of its values in at least one case.

Shapes (issue 19): ``N = 16384`` rows (16 x 1024), ``V`` 151936 (Qwen) and 128256 (Llama 3),
``d`` 4096 and 2048, bf16 / fp16 / fp32, and an odd ``N`` (17 x 963) and ``V`` (50257), whose
integer arguments and pointers lose Triton's divisibility-by-16 specialization.  The logits
are the strided slice a trainer takes (``out.logits[:, P - 1 : -1]``), the targets a slice of
the padded rows' ids; gradients go to a new buffer and in place; the vocabulary passes run
with and without the entropy.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterator, NamedTuple, Optional

import torch

from ..backends import get
from ..backends import linear_blocks
from ..backends.common import scale_rows_
from ..backends.kernel_loss import one_pass, two_pass
from ..backends.linear_one_pass import linear_one_pass
from ..backends.triton import linear_backward, linear_forward
from ..config import LensOptions
from ..groups import GroupLayout, contiguous_groups

PROMPT = 512
GROUP_SIZE = 8


class Shape(NamedTuple):
    batch: int
    length: int  # completion positions per row: N = batch * length
    vocab: int
    dim: int
    dtype: torch.dtype
    bias: bool  # the fused-linear head has a bias

    @property
    def label(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return f"{dtype} N={self.batch * self.length} V={self.vocab} d={self.dim}" + (" bias" if self.bias else "")


DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def shapes(full: bool) -> list[Shape]:
    """One production shape per dtype, or (``full``) every combination of the issue's."""
    if not full:
        return [Shape(16, 1024, 151936, 4096, dtype, False) for dtype in DTYPES]
    rows, vocabs, dims, biases = ((16, 1024), (17, 963)), (151936, 128256, 50257), (4096, 2048), (False, True)
    return [Shape(b, t, v, d, dtype, bias)
            for dtype, (b, t), v, d, bias in itertools.product(DTYPES, rows, vocabs, dims, biases)]


class Case(NamedTuple):
    """Options and inputs of one loss call on the logits path."""

    name: str
    options: dict
    old: bool = False
    ref: bool = False
    advantages: bool = False
    indexed: bool = False


CASES = (
    Case("lens off-policy, KL, dual clip, token-mean", dict(beta=0.04, clip_ratio_c=3.0, loss_agg_mode="token-mean"),
         old=True, ref=True),
    Case("lens on-policy", {}),
    Case("grpo on-policy, ref without KL, token sums, no std",
         dict(mode="grpo", loss_agg_mode="seq-mean-token-sum", scale_by_std=False), ref=True),
    Case("lens-negative-only off-policy, indexed groups, length_gamma",
         dict(mode="lens-negative-only", length_gamma=0.8, loss_agg_mode="seq-mean-token-sum-norm"),
         old=True, indexed=True),
    Case("lens-mixed-only on-policy, KL", dict(mode="lens-mixed-only", beta=0.04), ref=True),
    Case("caller advantages", {}, old=True, advantages=True),
)


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


class _Rollout(NamedTuple):
    """A padded batch as a trainer holds it: ``[B, P + T]`` rows, completions after the prompt."""

    logits: torch.Tensor  # [B, T, V] strided slice of [B, P + T, V]
    targets: torch.Tensor  # [B, T] slice of the int64 ids
    live: torch.Tensor  # [B, T] bool
    rewards: torch.Tensor  # [B]
    old: torch.Tensor  # [B, T] fp32
    ref: torch.Tensor  # [B, T] fp32


def _rollout(shape: Shape) -> _Rollout:
    b, t, v = shape.batch, shape.length, shape.vocab
    logits = _meta(b, PROMPT + t, v, dtype=shape.dtype)[:, PROMPT - 1 : -1]
    targets = _meta(b, PROMPT + t, dtype=torch.int64)[:, PROMPT:]
    return _Rollout(logits, targets, _meta(b, t, dtype=torch.bool), _meta(b), _meta(b, t), _meta(b, t))


def _groups(batch: int, indexed: bool) -> GroupLayout:
    if not indexed:
        return contiguous_groups(batch, GROUP_SIZE)
    count = -(-batch // GROUP_SIZE)
    index = lambda n: _meta(n, dtype=torch.int64)  # noqa: E731
    return GroupLayout(batch, count, GROUP_SIZE, 0, index(batch), index(batch), index(count), index(count))


def _loss_calls(roll: _Rollout, case: Case) -> None:
    """The forward and backward of one loss call, as ``ops.LensLoss`` sequences them."""
    options = LensOptions(backend="triton", temperature=0.9, **case.options)
    inputs = (roll.logits, roll.targets, roll.live, roll.rewards)
    groups = _groups(roll.logits.shape[0], case.indexed)
    old, ref = roll.old if case.old else None, roll.ref if case.ref else None
    advantages = _meta(roll.logits.shape[0]) if case.advantages else None
    scale = _meta()
    if case.old or case.advantages or options.mode == "grpo":
        for grad in (torch.empty_like(roll.logits), roll.logits, None):  # a new buffer, in place, no gradient
            one_pass(*inputs, old, ref, advantages, groups, options, grad)
        scale_rows_(roll.logits, scale)
    else:
        out = two_pass(*inputs, ref, groups, options)
        for inplace in (False, True):
            get("triton").logprobs_backward(out.dlogp, roll.logits, roll.targets, out.lse, options.inv_temperature,
                                            inplace, scale)


def _token_logprobs(roll: _Rollout, entropy: bool) -> None:
    """``token_logprobs`` (the custom op's forward and backward), and the masked forward."""
    kernels = get("triton")
    inv_t = 1 / 0.9
    out = kernels.logprobs_forward(roll.logits, roll.targets, inv_t, None, entropy)
    grad = _meta(*roll.targets.shape)
    kernels.logprobs_backward(grad, roll.logits, roll.targets, out[1], inv_t, False, None,
                              grad if entropy else None, out[2])
    kernels.logprobs_forward(roll.logits, roll.targets, inv_t, roll.live, entropy)


def logits_path(shape: Shape) -> Iterator[tuple[str, Callable[[], None]]]:
    """``(label, run)`` of every logits-path case at ``shape``."""
    roll = _rollout(shape)
    for case in CASES:
        yield f"loss: {case.name}, {shape.label}", lambda case=case: _loss_calls(roll, case)
    for with_entropy in (False, True):
        yield f"token_logprobs{' + entropy' if with_entropy else ''}, {shape.label}", \
            lambda e=with_entropy: _token_logprobs(roll, e)


class _Head(NamedTuple):
    hidden: torch.Tensor  # [N, d]
    weight: torch.Tensor  # [V, d]
    bias: Optional[torch.Tensor]  # [V]
    targets: torch.Tensor  # [N] contiguous
    live: torch.Tensor  # [N] bool


def _head(shape: Shape) -> _Head:
    rows = shape.batch * shape.length
    return _Head(_meta(rows, shape.dim, dtype=shape.dtype), _meta(shape.vocab, shape.dim, dtype=shape.dtype),
                 _meta(shape.vocab, dtype=shape.dtype) if shape.bias else None,
                 _meta(rows, dtype=torch.int64), _meta(rows, dtype=torch.bool))


def _tiles(head: _Head, entropy: bool) -> None:
    """The Triton tiles' forward (masked and not) and backward."""
    inv_t = 1 / 0.9
    args = (head.hidden, head.weight, head.bias, head.targets, inv_t)
    out = linear_forward.linear_logprobs_forward(*args, head.live, entropy)
    linear_forward.linear_logprobs_forward(*args, None, entropy)
    grad = _meta(head.hidden.shape[0])
    linear_backward.linear_logprobs_backward(grad, head.hidden, head.weight, head.bias, head.targets, out[1], inv_t,
                                             grad if entropy else None, out[2])


def _row_blocks(head: _Head, entropy: bool) -> None:
    """Library GEMMs on row blocks with the Triton row kernels (``blocks:triton``)."""
    inv_t = 1 / 0.9
    args = (head.hidden, head.weight, head.bias, head.targets, inv_t, "triton")
    out = linear_blocks.linear_logprobs_forward(*args, head.live, entropy)
    grad = _meta(head.hidden.shape[0])
    linear_blocks.linear_logprobs_backward(grad, head.hidden, head.weight, head.bias, head.targets, out[1], inv_t,
                                           "triton", grad if entropy else None, out[2])


def _one_pass(head: _Head, shape: Shape, gemm: str) -> None:
    """The fused-linear loss in one pass (off-policy LENS with KL), every gradient wanted."""
    roll = _rollout(shape)
    options = LensOptions(backend="triton", temperature=0.9, beta=0.04)
    targets, live = head.targets.view(shape.batch, shape.length), head.live.view(shape.batch, shape.length)
    linear_one_pass(head.hidden, head.weight, head.bias, targets, live, roll.rewards, roll.old, roll.ref, None,
                    contiguous_groups(shape.batch, GROUP_SIZE), options, (True, True, True), gemm)


def linear_path(shape: Shape) -> Iterator[tuple[str, Callable[[], None]]]:
    """``(label, run)`` of every fused-linear launch sequence at ``shape``."""
    head = _head(shape)
    for with_entropy in (False, True):
        suffix = f"{' + entropy' if with_entropy else ''}, {shape.label}"
        yield f"linear tiles{suffix}", lambda e=with_entropy: _tiles(head, e)
        yield f"linear blocks:triton{suffix}", lambda e=with_entropy: _row_blocks(head, e)
    for gemm in ("triton", "library"):
        yield f"linear one pass, gemm={gemm}, {shape.label}", lambda gemm=gemm: _one_pass(head, shape, gemm)


def production(full: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    """Every launch sequence at every shape of :func:`shapes`."""
    for shape in shapes(full):
        yield from logits_path(shape)
        yield from linear_path(shape)
