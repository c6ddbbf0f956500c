"""The two bandwidth floors of a forward+backward, both counting the completion mask.

A kernel that skips masked-out positions reads only the ``live`` rows of the logits (one
``[V]`` vector per position whose mask is 1), but must still write the whole gradient: every
row, masked ones as zeros.  At the device copy bandwidth ``bw`` (bytes read plus bytes
written per second, measured in the same run):

- two-pass floor: ``(2 * live + all) * V * itemsize / bw`` -- a forward pass and a backward
  pass each read the live rows, the backward writes the gradient;
- one-pass floor: ``(live + all) * V * itemsize / bw`` -- the gradient is written while the
  live rows are read once (possible when the advantages are known before the vocabulary pass:
  off-policy, GRPO mode, or caller-given advantages).

``x two-pass floor`` and ``x one-pass floor`` are the measured fwd+bwd time over each.
"""
from __future__ import annotations

from .problems import Inputs


def floor_bytes(inputs: Inputs, passes: int) -> int:
    """Bytes a ``passes``-pass forward+backward must move: ``passes`` reads of the live rows
    and one write of the whole gradient."""
    shape = inputs.shape
    row_bytes = shape.vocab * shape.dtype.itemsize
    return (passes * inputs.live_positions + shape.tokens) * row_bytes


def floor_ms(inputs: Inputs, bandwidth: float, passes: int) -> float:
    """One floor in milliseconds."""
    return floor_bytes(inputs, passes) / bandwidth * 1e3


def floors(inputs: Inputs, bandwidth: float, fwdbwd_ms: float) -> dict:
    """The record's floor fields: both floors (ms), the measured time over each, the mask
    density, and the one-pass bytes moved per second of the measured time (GB/s)."""
    two, one = floor_ms(inputs, bandwidth, 2), floor_ms(inputs, bandwidth, 1)
    return dict(
        mask_density=inputs.live_positions / inputs.shape.tokens,
        floor_2pass_ms=two,
        floor_1pass_ms=one,
        x_floor_2pass=fwdbwd_ms / two,
        x_floor_1pass=fwdbwd_ms / one,
        gbps_1pass=floor_bytes(inputs, 1) / (fwdbwd_ms * 1e-3) / 1e9,
    )
