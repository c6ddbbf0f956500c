"""Measure implementations on shapes: check first, then time, then peak memory.

For each shape the inputs are built once (plus copies to rotate through) and shared by every
implementation and mode.  An implementation is timed only after its loss and gradient on the
timed inputs pass the float64 check; one that is unavailable, fails the check, runs out of
memory or raises is recorded with the reason and the sweep goes on.
"""
from __future__ import annotations

import gc
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import check
from .measure import Timer, available_bytes, is_out_of_memory, peak_bytes
from .problems import Inputs, Shape, make_inputs
from .registry import Impl

MB = 2**20


def log(message: str) -> None:
    """A progress line on stderr that does not break a tqdm bar."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(message, file=sys.stderr, flush=True)
    else:
        tqdm.write(message, file=sys.stderr)


@dataclass(frozen=True)
class Settings:
    timer: Timer
    bandwidth: float  # bytes/s of a device copy, measured in the same run
    copies: int = 3  # input copies to rotate through, fewer when memory is short
    copy_fraction: float = 0.3  # of the free memory, for all copies together
    seed: int = 0

    @property
    def device(self) -> torch.device:
        return self.timer.device


def floor_seconds(shape: Shape, bandwidth: float) -> float:
    """Read the logits twice (forward, backward) and write one gradient, at copy bandwidth."""
    return 3 * shape.logits_bytes / bandwidth


def input_copies(shape: Shape, settings: Settings) -> list[Inputs]:
    base = make_inputs(shape, settings.device, settings.seed)
    full_bytes = base.full.numel() * base.full.element_size()
    room = int(settings.copy_fraction * available_bytes(settings.device) // max(1, full_bytes))
    return [base] + [base.copy() for _ in range(min(settings.copies, 1 + room) - 1)]


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def forward_backward(impl: Impl, fn: Callable[[Inputs], torch.Tensor]) -> Callable[[Inputs], torch.Tensor]:
    def step(inputs: Inputs) -> torch.Tensor:
        (grad,) = torch.autograd.grad(fn(inputs), impl.leaf(inputs))
        return grad

    return step


def measure(impl: Impl, mode: str, copies: list[Inputs], target: check.Gold, settings: Settings) -> dict:
    """One record: check, forward and forward+backward timings, peak memory, floor ratio."""
    shape = copies[0].shape
    record = dict(impl=impl.name, mode=mode, **shape.as_dict(), copies=len(copies), status="ok", reason=None)
    reason = impl.skip_reason(settings.device, mode)
    if reason:
        return {**record, "status": "skipped", "reason": reason}
    try:
        fn = impl.build(mode)
        step = forward_backward(impl, fn)
        start = time.perf_counter()
        inputs = copies[0]
        loss = fn(inputs)
        (grad,) = torch.autograd.grad(loss, impl.leaf(inputs))
        record["first_call_s"] = time.perf_counter() - start
        result = check.compare(loss, impl.logits_grad(grad), inputs, target)
        grad_bytes = grad.numel() * grad.element_size()
        del loss, grad
        record.update(result.as_dict())
        if not result.passed:
            reason = "not timed: loss or gradient off the float64 reference"
            return {**record, "status": "failed-check", "reason": reason}
        record.update(settings.timer(fn, copies).as_dict("fwd"))
        record.update(settings.timer(step, copies).as_dict("fwdbwd"))
        extra = peak_bytes(step, inputs, settings.device)
    except Exception as err:  # recorded, the sweep goes on
        status = "oom" if is_out_of_memory(err) else "error"
        text = str(err).strip()
        if status == "error":
            log("".join(traceback.format_exception(err)))
        first_line = text.splitlines()[0] if text else ""
        return {**record, "status": status, "reason": f"{type(err).__name__}: {first_line}"[:300]}
    finally:
        _release(settings.device)
    floor_s = floor_seconds(shape, settings.bandwidth)
    seconds = record["fwdbwd_median_ms"] * 1e-3
    record.update(
        floor_ms=floor_s * 1e3,
        gbps=3 * shape.logits_bytes / seconds / 1e9,
        x_floor=seconds / floor_s,
        peak_extra_mb=extra / MB,
        grad_mb=grad_bytes / MB,
        peak_extra_minus_grad_mb=(extra - grad_bytes) / MB,
    )
    return record


def summary(record: dict) -> str:
    head = f"{record['impl']:<19} {record['mode']:<5}"
    if record["status"] != "ok":
        return f"{head} {record['status']}: {record['reason']}"
    return (
        f"{head} fwd {record['fwd_median_ms']:.3g} ms, fwd+bwd {record['fwdbwd_median_ms']:.3g} ms "
        f"({record['x_floor']:.2f}x floor), peak +{record['peak_extra_mb']:.0f} MB, "
        f"grad err {record['grad_relative_error']:.1e} (rel)"
    )


def run(shapes: list[Shape], modes: list[str], impls: list[Impl], settings: Settings,
        on_record: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Every (shape, mode, implementation); a tqdm bar when tqdm is installed."""
    total = len(shapes) * len(modes) * len(impls)
    try:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="lens-bench", unit="run", file=sys.stderr, leave=False,
                   disable=not sys.stderr.isatty())
    except ImportError:
        bar = None
    records = []
    for shape in shapes:
        log(f"== {shape.label}: building inputs on {settings.device}")
        try:
            copies = input_copies(shape, settings)
            logp = check.gold_logprobs(copies[0])
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            log(f"   out of memory building the inputs of {shape.label}; skipped")
            records += [dict(impl=i.name, mode=m, **shape.as_dict(), status="oom", reason="inputs do not fit")
                        for m in modes for i in impls]
            if bar:
                bar.update(len(modes) * len(impls))
            _release(settings.device)
            continue
        for mode in modes:
            target = check.gold(copies[0], mode, logp)
            for impl in impls:
                record = measure(impl, mode, copies, target, settings)
                records.append(record)
                log("   " + summary(record))
                if on_record:
                    on_record(record)
                if bar:
                    bar.update(1)
        del copies, logp
        _release(settings.device)
    if bar:
        bar.close()
    return records
