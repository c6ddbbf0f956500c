"""Launching a Triton kernel with less host work than ``kernel[grid](...)``, and the launch
arithmetic in plain Python.

:func:`launch` does what ``JITFunction.run`` does for a specialization that is already
compiled: Triton's own binder specializes every argument as on any launch (dtypes, 16-byte
alignment of pointers, integer divisibility and width), so a view whose alignment changes, or a
new shape class, still gets its own compiled variant; the key finds that variant in the
kernel's cache; its C launcher runs on the current stream.  It skips only what a training loop
never uses: empty launch-hook chains (no launch-metadata record per launch), pre-run hooks,
per-call option parsing.  About 40% less host time per launch (Triton 3.6 on a CPU-only
stand-in H100; ``lens_kernels.bench.host_time``).  Anything else goes through
``kernel[grid](...)``, unchanged: the first launch of a specialization (it compiles), the
interpreter, hooks set by a profiler, an asynchronous compile, a Triton other than the 3.6
whose internals this reads, or ``LENS_KERNELS_FAST_LAUNCH=0``.

``triton.next_power_of_2`` and ``triton.cdiv`` are constexpr functions in Triton 3.6, whose
host-side call costs microseconds; :func:`next_power_of_2` and :func:`cdiv` are the plain
arithmetic.
"""
from __future__ import annotations

import os

import triton
from triton import knobs
from triton.runtime import driver

_FAST = triton.__version__.split(".")[:2] == ["3", "6"] and os.environ.get("LENS_KERNELS_FAST_LAUNCH", "1") != "0"
if _FAST:
    from triton.runtime.jit import compute_cache_key

_MISSING = object()


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` (``grid`` a tuple of 1 to 3 ints)."""
    compiled = _compiled(kernel, args, kwargs) if _FAST else None
    if compiled is None:
        kernel[grid](*args, **kwargs)
        return
    compiled, bound, stream = compiled
    grid_1 = grid[1] if len(grid) > 1 else 1
    grid_2 = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], grid_1, grid_2, stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *bound.values())


def _hooked(hook) -> bool:
    """A launch hook is set: a non-empty hook chain, or anything else that is not None."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _compiled(kernel, args: tuple, kwargs: dict):
    """``(compiled kernel, bound arguments, stream)`` when the fast path applies, else None
    (``kwargs`` gains the options ``JITFunction.run`` adds, with the values it would give)."""
    caches = getattr(kernel, "device_caches", None)
    runtime = knobs.runtime
    if caches is None or kernel.pre_run_hooks or _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook):
        return None
    active = driver.active
    device = active.get_current_device()
    cache = caches.get(device)
    if cache is None:
        return None
    kernel_cache, key_cache, _, _, binder = cache
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*args, **kwargs)
    compiled = kernel_cache.get(compute_cache_key(key_cache, specialization, options))
    if compiled is None or hasattr(compiled, "result"):
        return None
    for (name, _), (value, globals_dict) in kernel.used_global_vals.items():
        now = globals_dict.get(name, _MISSING)
        if now is not value and now != value:  # run() raises its error for this
            return None
    return compiled, bound, active.get_current_stream(device)
