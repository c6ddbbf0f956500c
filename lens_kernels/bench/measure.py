"""Timing, peak memory and copy bandwidth, on CUDA devices and on the CPU.

Times are medians over many runs after warm-up, taken with CUDA events on a GPU and
``time.perf_counter`` on the CPU; successive runs read different input copies so that no run
finds its logits in cache.  The host time of a call (:meth:`Timer.host`) is how long it blocks
the Python thread: ``time.perf_counter`` around the call, started on an idle device and
stopped before any synchronize, so on a GPU it is the launch, validation and sync overhead.  Peak memory is what a call allocates above what was allocated
before it (the inputs): ``torch.cuda.max_memory_allocated`` on a GPU, the profiler's
allocation events on the CPU.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median, quartiles and minimum over ``runs`` timed calls."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    runs: int

    def as_dict(self, prefix: str) -> dict:
        return {f"{prefix}_{key}": value for key, value in asdict(self).items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timer:
    """``warmup`` untimed calls, then as many timed calls as fit in ``budget_s`` (at least
    ``min_runs``, at most ``max_runs``), cycling through the inputs given."""

    device: torch.device
    warmup: int = 3
    min_runs: int = 10
    max_runs: int = 100
    budget_s: float = 3.0

    def __call__(self, step: Callable[[Any], Any], inputs: Sequence[Any]) -> Timing:
        """Device time per call (CUDA events on a GPU, the host clock on the CPU)."""
        runs = self._warm_up(step, inputs)
        times = self._cuda(step, inputs, runs) if self.device.type == "cuda" else self._host(step, inputs, runs)
        return _timing(times)

    def host(self, step: Callable[[Any], Any], inputs: Sequence[Any]) -> Timing:
        """Host time per call: the device is synchronized before each call, the host clock
        stopped when the call returns (before any synchronize)."""
        runs = self._warm_up(step, inputs)
        return _timing(self._host(step, inputs, runs, idle_first=True))

    def _warm_up(self, step, inputs) -> int:
        """Untimed calls; returns how many timed calls fit the budget."""
        start = time.perf_counter()
        for i in range(max(1, self.warmup)):
            step(inputs[i % len(inputs)])
        synchronize(self.device)
        per_call = (time.perf_counter() - start) / max(1, self.warmup)
        return int(min(self.max_runs, max(self.min_runs, self.budget_s / max(per_call, 1e-6))))

    def _cuda(self, step, inputs, runs: int) -> list[float]:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
        for i, (begin, end) in enumerate(events):
            begin.record()
            step(inputs[i % len(inputs)])
            end.record()
        torch.cuda.synchronize(self.device)
        return [begin.elapsed_time(end) for begin, end in events]

    def _host(self, step, inputs, runs: int, idle_first: bool = False) -> list[float]:
        times = []
        for i in range(runs):
            if idle_first:
                synchronize(self.device)
            begin = time.perf_counter()
            step(inputs[i % len(inputs)])
            times.append((time.perf_counter() - begin) * 1e3)
        return times


def _timing(times: list[float]) -> Timing:
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Timing(statistics.median(times), quartiles[0], quartiles[2], min(times), len(times))


def peak_bytes(step: Callable[[Any], Any], inputs: Any, device: torch.device) -> int:
    """Bytes allocated at the peak of ``step(inputs)`` above those allocated before it; what
    ``step`` returns is held until the end (so a returned gradient counts)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = step(inputs)
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = step(inputs)
        del result
    return host_peak(prof)


def host_peak(prof) -> int:
    """Peak of the running sum of the CPU allocations and frees a profile recorded (frees of
    blocks allocated before the profile are not reported, so they never lower the sum)."""
    events = [
        e for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    total = peak = 0
    for event in events:
        total += event.nbytes()
        peak = max(peak, total)
    return peak


def copy_bandwidth(timer: Timer, nbytes: int) -> float:
    """Device copy bandwidth in bytes/s (bytes read plus bytes written per second) of one
    ``nbytes`` buffer copied into another, timed like every implementation."""
    numel = nbytes // 4
    src = torch.ones(numel, device=timer.device)
    dst = torch.zeros(numel, device=timer.device)
    timing = timer(lambda _: dst.copy_(src), [None])
    return 2 * numel * 4 / (timing.median_ms * 1e-3)


def default_copy_bytes(device: torch.device) -> int:
    """Large enough to dwarf every cache: 1 GiB on a GPU, 256 MiB on the CPU."""
    return 2**30 if device.type == "cuda" else 2**28


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device`` now (the host's available memory for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 * 2**30


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
