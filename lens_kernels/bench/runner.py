"""Measure implementations on shapes: check first, then time, then peak memory.

For each shape the inputs are built once (plus copies to rotate through) and shared by every
implementation, policy and mode; the off-policy problem is the same inputs with
``old_logprobs`` from :func:`~lens_kernels.bench.problems.off_policy_logprobs`.  An
implementation is timed only after its loss and gradient on the timed inputs pass the float64
check; one that is unavailable, fails the check, runs out of memory or raises is recorded with
the reason and the sweep goes on.  Past ``Settings.deadline`` the remaining runs are recorded
as skipped, so a time-boxed run still writes its results.
"""
from __future__ import annotations

import gc
import sys
import time
import traceback
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from . import check
from .floors import floors
from .measure import Timer, available_bytes, is_out_of_memory, peak_bytes
from .problems import Inputs, Shape, make_inputs, off_policy_logprobs
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
    deadline: Optional[float] = None  # time.monotonic() after which no run starts
    progress: bool = True  # a line on stderr per shape and per measurement

    @property
    def device(self) -> torch.device:
        return self.timer.device


def input_copies(shape: Shape, settings: Settings) -> list[Inputs]:
    base = make_inputs(shape, settings.device, settings.seed)
    full_bytes = base.full.numel() * base.full.element_size()
    room = int(settings.copy_fraction * available_bytes(settings.device) // max(1, full_bytes))
    return [base] + [base.copy() for _ in range(min(settings.copies, 1 + room) - 1)]


def _release(device: torch.device) -> None:
    """Return a run's device memory to the driver, cycles included (a no-op on the CPU, where
    refcounting already freed it and a full collection costs up to a second)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def forward_backward(impl: Impl, fn: Callable[[Inputs], torch.Tensor]) -> Callable[[Inputs], torch.Tensor]:
    def step(inputs: Inputs) -> torch.Tensor:
        (grad,) = torch.autograd.grad(fn(inputs), impl.leaf(inputs))
        return grad

    return step


def off_policy(copies: list[Inputs], logp, seed: int) -> list[Inputs]:
    """The copies with the same ``old_logprobs`` (policy log-probs plus noise)."""
    old = off_policy_logprobs(logp, copies[0].completion_mask, seed)
    return [replace(c, old_logprobs=old) for c in copies]


def measure(impl: Impl, mode: str, copies: list[Inputs], target: check.Gold, settings: Settings) -> dict:
    """One record: check, forward and forward+backward device time, forward+backward host
    time, peak memory, the two floors."""
    shape = copies[0].shape
    record = dict(impl=impl.name, mode=mode, policy=copies[0].policy, **shape.as_dict(), copies=len(copies),
                  clip_fraction=target.clip_fraction, status="ok", reason=None)
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
        fwdbwd = settings.timer(step, copies)
        record.update(fwdbwd.as_dict("fwdbwd"))
        # On the CPU nothing is asynchronous: the host time is the fwd+bwd time just taken.
        host = settings.timer.host(step, copies) if settings.device.type == "cuda" else fwdbwd
        record.update(host.as_dict("host_fwdbwd"))
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
    record.update(
        **floors(inputs, settings.bandwidth, record["fwdbwd_median_ms"]),
        peak_extra_mb=extra / MB,
        grad_mb=grad_bytes / MB,
        peak_extra_minus_grad_mb=(extra - grad_bytes) / MB,
    )
    return record


def summary(record: dict) -> str:
    head = f"{record['impl']:<19} {record['policy']}-policy {record['mode']:<5}"
    if record["status"] != "ok":
        return f"{head} {record['status']}: {record['reason']}"
    return (
        f"{head} fwd {record['fwd_median_ms']:.3g} ms, fwd+bwd {record['fwdbwd_median_ms']:.3g} ms "
        f"(host {record['host_fwdbwd_median_ms']:.3g} ms; {record['x_floor_2pass']:.2f}x two-pass, "
        f"{record['x_floor_1pass']:.2f}x one-pass floor), peak +{record['peak_extra_mb']:.0f} MB, "
        f"grad err {record['grad_relative_error']:.1e} (rel)"
    )


def _unrun(shape: Shape, policies, modes, impls, status: str, reason: str) -> list[dict]:
    return [dict(impl=i.name, mode=m, policy=pol, **shape.as_dict(), status=status, reason=reason)
            for pol in policies for m in modes for i in impls]


def _past(deadline: Optional[float]) -> bool:
    return deadline is not None and time.monotonic() > deadline


def run(shapes: list[Shape], modes: list[str], impls: list[Impl], settings: Settings,
        on_record: Optional[Callable[[dict], None]] = None, policies: tuple = ("on",)) -> list[dict]:
    """Every (shape, policy, mode, implementation); a tqdm bar when tqdm is installed."""
    total = len(shapes) * len(policies) * len(modes) * len(impls)
    try:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="lens-bench", unit="run", file=sys.stderr, leave=False,
                   disable=not sys.stderr.isatty())
    except ImportError:
        bar = None
    records = []

    def add(record: dict) -> None:
        records.append(record)
        if on_record:
            on_record(record)
        if bar:
            bar.update(1)

    for shape in shapes:
        if _past(settings.deadline):
            log(f"== {shape.label}: not run, past the time limit")
            for record in _unrun(shape, policies, modes, impls, "skipped", "not run: the run's time limit was reached"):
                add(record)
            continue
        if settings.progress:
            log(f"== {shape.label}: building inputs on {settings.device}")
        try:
            copies = input_copies(shape, settings)
            logp = check.gold_logprobs(copies[0])
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            log(f"   out of memory building the inputs of {shape.label}; skipped")
            for record in _unrun(shape, policies, modes, impls, "oom", "inputs do not fit"):
                add(record)
            _release(settings.device)
            continue
        for policy in policies:
            problem = copies if policy == "on" else off_policy(copies, logp, settings.seed)
            for mode in modes:
                target = check.gold(problem[0], mode, logp)
                for impl in impls:
                    if _past(settings.deadline):
                        record = _unrun(shape, [policy], [mode], [impl], "skipped",
                                        "not run: the run's time limit was reached")[0]
                    else:
                        record = measure(impl, mode, problem, target, settings)
                        if settings.progress:
                            log("   " + summary(record))
                    add(record)
        del copies, logp
        _release(settings.device)
    if bar:
        bar.close()
    return records
