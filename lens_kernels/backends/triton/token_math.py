"""SPEC step 8 for one token, as a Triton function shared by the token kernel (two-pass path)
and the fused vocabulary kernel (one-pass path).  Works on scalars and blocks alike.

Conventions follow ``lens_kernels.reference`` (autograd of its formulas): ``torch.minimum``
splits its gradient on exact ties, ``clamp`` passes it on the closed interval.  All arithmetic
is float64, like the reference: the loss is often a near-cancelling sum (advantages are
zero-mean per group; on-policy it is 0 up to rounding), which fp32 would only match to ~1e-8.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..common.nan_math import nan_maximum, nan_minimum


@triton.jit
def token_terms(
    logp, old, a, ref,
    clip_low, clip_high, clip_ratio_c, beta,
    DUAL_CLIP: tl.constexpr, HAS_REF: tl.constexpr, ADD_KL: tl.constexpr,
):
    """``(loss, d loss / d logp, clipped, k3)`` of one token (float64; ``k3`` 0 without ref).

    ``loss = -min(a * ratio, a * clip(ratio))`` with ``ratio = exp(logp - old)``, then the
    dual clip ``min(loss, -a * c)`` for ``a < 0`` and ``+ beta * k3`` when ``ADD_KL``.
    """
    # NaN-propagating min/max (Triton's default drops a NaN operand, torch's keeps it): a NaN
    # log-prob or old log-prob gives a NaN loss, as in the reference.
    # a = 0 contributes 0 whatever the ratio (one that overflows would give 0 * inf = NaN), a NaN
    # ratio excepted; an overflowing ratio on the clipped branch gives d_clipped = 0, never inf * 0.
    ratio = tl.exp(logp - old)
    clipped_ratio = nan_minimum(nan_maximum(ratio, clip_low), clip_high)
    unclipped = tl.where(ratio != ratio, ratio, tl.where(a == 0, 0.0, a * ratio))
    clipped = a * clipped_ratio
    d_unclipped = unclipped
    d_clipped = tl.where((ratio >= clip_low) & (ratio <= clip_high), d_unclipped, 0.0)
    d_min = tl.where(
        unclipped < clipped, d_unclipped,
        tl.where(clipped < unclipped, d_clipped, 0.5 * (d_unclipped + d_clipped)),
    )
    loss = -nan_minimum(unclipped, clipped)
    d_loss = -d_min
    is_clipped = tl.where(-clipped > -unclipped, 1.0, 0.0).to(tl.float64)
    if DUAL_CLIP:
        cap = -a * clip_ratio_c
        d_capped = tl.where(loss < cap, d_loss, tl.where(loss == cap, 0.5 * d_loss, 0.0))
        d_loss = tl.where(a < 0, d_capped, d_loss)
        loss = tl.where(a < 0, nan_minimum(loss, cap), loss)
    k3 = tl.zeros_like(loss)
    if HAS_REF:
        delta = ref - logp
        exp_delta = tl.exp(delta)
        k3 = exp_delta - delta - 1
        if ADD_KL:
            loss = loss + beta * k3
            d_loss = d_loss + beta * (1 - exp_delta)
    return loss, d_loss, is_clipped, k3


def surrogate_args(options, has_ref: bool) -> tuple[tuple, dict]:
    """The scalar arguments and constexprs of :func:`token_terms` for ``options``."""
    scalars = (1 - options.eps_low, 1 + options.eps_high, float(options.clip_ratio_c or 0.0), float(options.beta))
    flags = dict(DUAL_CLIP=options.clip_ratio_c is not None, HAS_REF=has_ref, ADD_KL=has_ref and options.beta > 0)
    return scalars, flags
