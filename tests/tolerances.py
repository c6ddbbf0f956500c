"""Per-dtype comparison against the float64 reference.

fp32: within 1e-5 of the reference, relative to the largest magnitude of the compared tensor.
bf16/fp16: no worse than PyTorch's own error, i.e. the reference evaluated entirely in that
dtype (``compute_dtype``), both measured against the float64 reference on the same inputs.
"""
from __future__ import annotations

import torch

FP32_RTOL = 1e-5


def max_error(value: torch.Tensor, gold: torch.Tensor) -> float:
    value, gold = value.detach().double(), gold.detach().double()
    both_inf = torch.isinf(value) & torch.isinf(gold) & (torch.sign(value) == torch.sign(gold))
    diff = torch.where(both_inf, 0.0, (value - gold).abs())
    return float(diff.max()) if diff.numel() else 0.0


def check(
    name: str, value: torch.Tensor, gold: torch.Tensor, native: torch.Tensor | None, dtype: torch.dtype,
    ulp_slack: float = 0.0,
):
    """Assert ``value`` matches ``gold`` for inputs of ``dtype`` (``native``: PyTorch's own
    result in that dtype, required for bf16/fp16).  ``ulp_slack`` adds that many units in the
    last place of ``dtype`` at the tensor's scale (for Triton's interpreter, which truncates
    fp32 -> bf16 where a GPU rounds to nearest)."""
    assert value.shape == gold.shape, f"{name}: shape {tuple(value.shape)} != {tuple(gold.shape)}"
    assert not torch.isnan(value).any(), f"{name}: NaN in output"
    finite = gold.detach()[torch.isfinite(gold.detach())].double()
    scale = float(finite.detach().abs().max()) if finite.numel() else 1.0
    err = max_error(value, gold)
    floor = FP32_RTOL * max(scale, 1e-6) + ulp_slack * torch.finfo(dtype).eps * scale
    if dtype == torch.float32:
        assert err <= floor, f"{name}: max error {err:.3g} > {floor:.3g} (1e-5 relative to {scale:.3g})"
        return
    base = max_error(native, gold)
    assert err <= base + floor, (
        f"{name}: max error {err:.3g} exceeds PyTorch's own {dtype} error {base:.3g} (+{floor:.2g})"
    )
