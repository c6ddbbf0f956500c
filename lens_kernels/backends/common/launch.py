"""Launching a Triton kernel with less host work than ``kernel[grid](...)``, and the launch
arithmetic in plain Python.

:func:`launch` is ``kernel[grid](*args, **kwargs)`` with the launch bound once per shape
class.  The first launch of a class goes through Triton's binder (the specialization of every
argument), its kernel cache and the checks of ``JITFunction.run``; the compiled kernel found
is then kept under the class's **signature**: per argument its value for an int (Triton
specializes on ``== 1``, divisibility by 16 and width), its type for a float (never
specialized), ``None``, or for a tensor its dtype and whether its address is 16-byte aligned
(what Triton specializes a pointer on); the constexpr keywords; the device; Triton's debug and
instrumentation knobs.  A later launch with the same signature calls that kernel's C launcher
directly on the current stream.  So a view whose alignment changes, a new shape or a new
constexpr never reuses a kernel specialized for something else: its signature differs, and
it takes Triton's path.

Skipped on that path, as a training loop never needs them: empty launch-hook chains (no
launch-metadata record per launch), per-call option parsing, and the per-launch comparison of
the module globals a kernel read when it compiled (checked once per kernel; ``lens_kernels``
never rebinds them).  A launch with an argument of another type (e.g. a bool or a NumPy
integer) is bound by Triton's binder every time (no plan is kept).  Everything goes through
``kernel[grid](...)`` unchanged under the interpreter, with launch hooks or pre-run hooks set
(profilers), before a specialization is compiled or while it compiles asynchronously, on a
Triton other than the 3.6 whose internals this reads, or with ``LENS_KERNELS_FAST_LAUNCH=0``.

Host time per launch of the finalize kernel (8 arguments), Triton 3.6 on the CPU-only
stand-in H100 of ``lens_kernels.bench.host_time``: see benchmarks/NOTES.md.

``triton.next_power_of_2`` and ``triton.cdiv`` are constexpr functions in Triton 3.6, whose
host-side call costs microseconds; :func:`next_power_of_2` and :func:`cdiv` are the plain
arithmetic.
"""
from __future__ import annotations

import os

import torch
import triton
from triton import knobs
from triton.runtime import driver

_FAST = triton.__version__.split(".")[:2] == ["3", "6"] \
    and os.environ.get("LENS_KERNELS_FAST_LAUNCH", "1") != "0"
if _FAST:
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.jit import compute_cache_key

_MISSING = object()
_PLANS: dict = {}  # signature -> (compiled kernel, the bound constexpr values that follow the arguments)
_MAX_PLANS = 4096
# Kernels (by id: a JITFunction's hash is slow) whose module globals, read when they compiled,
# were found unchanged, with how many there were: run() compares them on every launch.
_GLOBALS_CHECKED: dict = {}


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``: ``grid`` a tuple of 1 to 3 ints, ``args`` the
    kernel's leading parameters in order, ``kwargs`` the rest (constexprs, ``num_warps``)."""
    plan = _plan(kernel, args, kwargs) if _FAST else None
    if plan is None:
        kernel[grid](*args, **kwargs)
        return
    compiled, tail, stream = plan
    grid_1 = grid[1] if len(grid) > 1 else 1
    grid_2 = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], grid_1, grid_2, stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *args, *tail)


def _hooked(hook) -> bool:
    """A launch hook is set: a non-empty hook chain, or anything else that is not None."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _signature(args: tuple):
    """What Triton specializes the arguments on (a superset), or None for an argument type
    this does not know."""
    signature = []
    for arg in args:
        kind = type(arg)
        if kind is int:
            signature.append(arg)
        elif kind is float or arg is None:
            signature.append(kind)
        elif isinstance(arg, torch.Tensor):
            signature.append((arg.dtype, arg.data_ptr() & 15 == 0))
        else:
            return None
    return tuple(signature)


def _plan(kernel, args: tuple, kwargs: dict):
    """``(compiled kernel, constexpr tail, stream)`` for the fast path, or None."""
    caches = getattr(kernel, "device_caches", None)
    runtime = knobs.runtime
    if caches is None or kernel.pre_run_hooks or _hooked(runtime.launch_enter_hook) \
            or _hooked(runtime.launch_exit_hook):
        return None
    active = driver.active
    device = active.get_current_device()
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    signature = _signature(args)
    key = None if signature is None else (id(kernel), device, signature, tuple(kwargs.items()))
    plan = None if key is None else _PLANS.get(key)
    if plan is None:
        plan = _bind(kernel, caches.get(device), args, kwargs)
        if plan is None:
            return None
        if key is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
    return plan[0], plan[1], active.get_current_stream(device)


def _bind(kernel, cache, args: tuple, kwargs: dict):
    """What ``JITFunction.run`` finds for these arguments: ``(compiled kernel, constexpr
    tail)``, or None when it would compile (or is compiling), or would raise."""
    if cache is None:
        return None
    kernel_cache, key_cache, _, _, binder = cache
    bound, specialization, options = binder(*args, **kwargs)
    compiled = kernel_cache.get(compute_cache_key(key_cache, specialization, options))
    if type(compiled) is not CompiledKernel:  # not compiled yet, or still compiling (a future)
        return None
    if _GLOBALS_CHECKED.get(id(kernel)) != len(kernel.used_global_vals):
        for (name, _), (value, globals_dict) in kernel.used_global_vals.items():
            if globals_dict.get(name, _MISSING) != value:  # run() raises its error for this
                return None
        _GLOBALS_CHECKED[id(kernel)] = len(kernel.used_global_vals)
    values = list(bound.values())
    if any(value is not arg for value, arg in zip(values, args)):  # not the leading parameters
        return None
    return compiled, tuple(values[len(args):])
