"""Host time of one ``fused_lens_loss(...).loss.backward()`` with ``check_values=False``,
measured on a machine without a GPU through the stand-in H100 of :mod:`.stand_in_gpu`.

The real code path runs end to end (validation, options, custom-op plumbing, autograd, the
launchers, Triton's binder / cache lookup / C launcher, the cuda backend's ctypes calls); only
the device work and the driver's own launch latency are missing (see ``stand_in_gpu``).  Per
case (backend x mode x policy) it reports the median and p10 over ``--calls`` timed calls,
``--repeats`` times (cases interleaved, so that load from other jobs spreads over all of
them), the device launches and aten operators of one call, and a cProfile by own time.

    python -m lens_kernels.bench.host_time --label after \\
        --save benchmarks/results/cpu-host-time.json

``--save`` merges the run into the JSON file under ``--label`` (so one file holds the
``before`` and ``after`` runs) and renders the file as markdown next to it.
Run it in a process of its own, without ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import datetime
import gc
import io
import json
import os
import platform
import pstats
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

CASES = [(backend, mode, policy)
         for backend in ("triton", "cuda") for mode in ("grpo", "lens") for policy in ("off", "on")]
PROFILED = [("triton", "grpo", "off"), ("triton", "lens", "on")]
INCLUDED = ("validation, options, custom-op plumbing and autograd of lens_kernels; the launchers and their "
            "torch allocations (CPU malloc); Triton's launch path as lens_kernels takes it (JITFunction.run: "
            "binder, specialization, cache lookup, launch metadata; or backends.common.launch) down to the "
            "generated C launcher, for kernels compiled for sm_90; the cuda backend's ctypes calls (argument "
            "conversion)")
EXCLUDED = ("the CUDA driver's launch latency (cuLaunchKernelEx and the stub cuda backend return at once), the CUDA "
            "caching allocator (CPU malloc instead, set to keep freed blocks: the [B, T, V] gradient buffer is "
            "reused, not mapped and unmapped per call), torch.cuda device/stream queries, device time")


def make_inputs(batch: int, length: int, vocab: int, group_size: int, policy: str) -> dict:
    """Keyword arguments of ``fused_lens_loss`` (bf16 logits never read: the kernels do not run)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.empty(batch, length, vocab, dtype=torch.bfloat16).requires_grad_()
    positions = torch.arange(length)
    ends = torch.randint(length // 2, length + 1, (batch, 1), generator=gen)
    inputs = dict(
        logits=logits,
        target_ids=torch.randint(0, vocab, (batch, length), generator=gen),
        completion_mask=positions < ends,
        rewards=(torch.rand(batch, generator=gen) < 0.4).float(),
        group_size=group_size,
    )
    if policy == "off":
        inputs["old_logprobs"] = -torch.rand(batch, length, generator=gen)
    return inputs


def make_step(inputs: dict, backend: str, mode: str) -> Callable[[], None]:
    import lens_kernels as lk

    logits = inputs["logits"]

    def step() -> None:
        out = lk.fused_lens_loss(**inputs, mode=mode, backend=backend, check_values=False)
        out.loss.backward()
        logits.grad = None

    return step


def time_calls(step: Callable[[], None], calls: int) -> tuple[list[float], list[float]]:
    """Microseconds of each of ``calls`` calls: wall clock, and this thread's CPU time (which
    leaves out the waits for a core on a machine shared with other jobs)."""
    wall, cpu = [], []
    wall_clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for _ in range(calls):
        start_wall, start_cpu = wall_clock(), cpu_clock()
        step()
        cpu.append((cpu_clock() - start_cpu) / 1e3)
        wall.append((wall_clock() - start_wall) / 1e3)
    return wall, cpu


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return dict(median_us=round(statistics.median(ordered), 1), p10_us=round(at(0.1), 1), p90_us=round(at(0.9), 1))


class _AtenCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count_work(step: Callable[[], None]) -> dict:
    """Device launches (Triton kernels by name, cuda backend C calls) and aten operators of one call."""
    from triton import knobs

    from ..backends.cuda import library

    launches = collections.Counter()
    real = library.load()

    class Counting:
        def __getattr__(self, name):
            if name.startswith("lk_"):
                launches[name] += 1
            return getattr(real, name)

    def count(metadata) -> None:
        launches[metadata.get()["name"]] += 1

    knobs.runtime.launch_enter_hook.add(count)  # a hook set: launches take Triton's own path
    load, library.load = library.load, lambda: Counting()
    try:
        with _AtenCounter() as aten:
            step()
    finally:
        knobs.runtime.launch_enter_hook.remove(count)
        library.load = load
    return dict(launches=sum(launches.values()), kernels=dict(sorted(launches.items())),
                aten_ops=sum(aten.ops.values()), aten=dict(sorted(aten.ops.items())),
                allocations=sum(n for op, n in aten.ops.items() if op.startswith("empty")))


def compiled_targets() -> dict:
    """``{kernel name: ["cuda:90", ...]}`` for every lens_kernels Triton kernel compiled so far."""
    from triton.runtime.jit import JITFunction

    found = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("lens_kernels"):
            continue
        for value in vars(module).values():
            if isinstance(value, JITFunction):
                targets = {f"{k.metadata.target.backend}:{k.metadata.target.arch}"
                           for cache in value.device_caches.values() for k in cache[0].values()}
                if targets:
                    found[value.__name__] = sorted(targets)
    return dict(sorted(found.items()))


def profile(step: Callable[[], None], calls: int, lines: int = 25) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        step()
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(lines)
    text = stream.getvalue()
    for prefix in (str(Path(torch.__file__).parents[1]), str(Path(__file__).resolve().parents[2])):
        text = text.replace(prefix + "/", "")
    return text.strip()


def environment(command: str, tree: str | None) -> dict:
    from . import report

    repo = Path(__file__).resolve().parents[2]
    commit = report._run(["git", "rev-parse", "--short", "HEAD"], repo)
    dirty = report._run(["git", "status", "--porcelain", "--untracked-files=no", "lens_kernels"], repo)
    return dict(
        command=command,
        date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        host_cpu=f"{report.cpu_model()} ({os.cpu_count()} cores)",
        python=platform.python_version(), torch=torch.__version__, triton=report._version("triton"),
        git_commit=None if commit is None else commit + ("-dirty" if dirty else ""), tree=tree,
        load_average=[round(x, 2) for x in os.getloadavg()],
        included=INCLUDED, excluded=EXCLUDED,
    )


def run(args: argparse.Namespace) -> dict:
    from . import stand_in_gpu

    stand_in_gpu.activate()
    cases = [c for c in CASES if c[0] in args.backends and c[1] in args.modes and c[2] in args.policies]
    steps = {}
    for backend, mode, policy in cases:
        inputs = make_inputs(args.batch, args.length, args.vocab, args.group_size, policy)
        steps[backend, mode, policy] = make_step(inputs, backend, mode)
        steps[backend, mode, policy]()  # compiles the kernels of the case
    results = {case: dict(work=count_work(step), wall=[], cpu=[]) for case, step in steps.items()}
    for _ in range(args.repeats):
        for case, step in steps.items():
            time_calls(step, args.warmup)
            gc.collect()
            wall, cpu = time_calls(step, args.calls)
            results[case]["wall"].append(wall)
            results[case]["cpu"].append(cpu)
    records = []
    for (backend, mode, policy), result in results.items():
        record = dict(backend=backend, mode=mode, policy=policy)
        for clock in ("cpu", "wall"):
            record[clock] = dict(**summary([t for times in result[clock] for t in times]),
                                 repeat_medians_us=[summary(times)["median_us"] for times in result[clock]])
        records.append(dict(record, **result["work"]))
    profiles = {f"{b} {m} {p}-policy": profile(steps[b, m, p], args.profile_calls)
                for b, m, p in PROFILED if (b, m, p) in steps and args.profile_calls}
    command = "python -m lens_kernels.bench.host_time " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return dict(environment=environment(command, args.tree),
                shape=dict(batch=args.batch, length=args.length, vocab=args.vocab, group_size=args.group_size,
                           dtype="bfloat16", calls=args.calls, repeats=args.repeats, warmup=args.warmup),
                compiled=compiled_targets(), results=records, profiles=profiles)


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(runs: dict) -> str:
    """The saved runs (``{label: run}``) as one markdown page: the CPU-time medians of every
    label side by side, then each run's details and profiles."""
    labels = list(runs)
    keyed = {label: {(r["backend"], r["mode"], r["policy"]): r for r in run["results"]} for label, run in runs.items()}
    cases = list(keyed[labels[0]])
    env = runs[labels[0]]["environment"]
    ratio = ("before", "after") if {"before", "after"} <= set(labels) else (labels[0], labels[-1])
    lines = ["# Host time of a forward+backward (CPU, stand-in H100)", "",
             "`fused_lens_loss(...).loss.backward()` with `check_values=False`, bf16 logits, microseconds per call: "
             "this thread's CPU time (the machine is shared with other jobs: the wall clock also counts waits for a "
             "core, so it is given beside it, and the medians of each repeat show the spread).", "",
             f"- included: {env['included']}", f"- not included: {env['excluded']}", "",
             _row(["backend", "mode", "policy"] + [f"{label} CPU median (p10)" for label in labels]
                  + ([f"{ratio[1]} / {ratio[0]}"] if len(labels) > 1 else [])),
             "|" + "---|" * (3 + len(labels) + (len(labels) > 1))]
    for case in cases:
        found = [keyed[label].get(case) for label in labels]
        cells = ["-" if r is None else f"{r['cpu']['median_us']:.0f} ({r['cpu']['p10_us']:.0f})" for r in found]
        if len(labels) > 1:
            first, last = keyed[ratio[0]].get(case), keyed[ratio[1]].get(case)
            cells.append("-" if first is None or last is None
                         else f"{last['cpu']['median_us'] / first['cpu']['median_us']:.2f}")
        lines.append(_row(list(case) + cells))
    for label, run in runs.items():
        env, shape = run["environment"], run["shape"]
        lines += ["", f"## {label}", "",
                  f"- command: `{env['command']}`",
                  f"- code: {env.get('tree') or 'commit ' + str(env['git_commit'])}, run {env['date_utc']}",
                  f"- machine: {env['host_cpu']}, load average {env['load_average']} at the end "
                  "(shared with other jobs)",
                  f"- python {env['python']}, torch {env['torch']}, triton {env['triton']}",
                  f"- shape: B={shape['batch']} T={shape['length']} V={shape['vocab']} G={shape['group_size']}, "
                  f"{shape['calls']} timed calls x {shape['repeats']} repeats (cases interleaved) after "
                  f"{shape['warmup']} warm-up calls each",
                  "- kernels compiled: " + ", ".join(f"{k} ({'/'.join(v)})" for k, v in run["compiled"].items()), "",
                  _row(["backend", "mode", "policy", "CPU median", "CPU p10", "CPU repeat medians", "wall median",
                        "wall p10", "wall repeat medians", "launches", "allocations", "aten ops"]),
                  "|" + "---|" * 12]
        for r in run["results"]:
            cpu, wall = r["cpu"], r["wall"]
            lines.append(_row([r["backend"], r["mode"], r["policy"], f"{cpu['median_us']:.0f}", f"{cpu['p10_us']:.0f}",
                               " / ".join(f"{m:.0f}" for m in cpu["repeat_medians_us"]), f"{wall['median_us']:.0f}",
                               f"{wall['p10_us']:.0f}", " / ".join(f"{m:.0f}" for m in wall["repeat_medians_us"]),
                               r["launches"], r["allocations"], r["aten_ops"]]))
        for case, text in run["profiles"].items():
            lines += ["", f"### cProfile, {case}, by own time", "", "```", text, "```"]
    return "\n".join(lines) + "\n"


def save(run_result: dict, label: str, path: Path) -> None:
    runs = json.loads(path.read_text()) if path.exists() else {}
    runs[label] = run_result
    path.write_text(json.dumps(runs, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(runs))


def parser() -> argparse.ArgumentParser:
    words = lambda text: text.split(",")  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m lens_kernels.bench.host_time", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--backends", type=words, default=["triton", "cuda"])
    p.add_argument("--modes", type=words, default=["grpo", "lens"])
    p.add_argument("--policies", type=words, default=["off", "on"])
    p.add_argument("--calls", type=int, default=300, help="timed calls per case and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--profile-calls", type=int, default=200, help="calls under cProfile (0: none)")
    p.add_argument("--label", default="run")
    p.add_argument("--tree", help="what code was measured, when not a git checkout (e.g. a commit minus some patches)")
    p.add_argument("--save", type=Path, help="JSON file to merge the run into (markdown written beside it)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    result = run(args)
    for r in result["results"]:
        cpu, wall = r["cpu"], r["wall"]
        print(f"{r['backend']:6} {r['mode']:4} {r['policy']:3}-policy: CPU median {cpu['median_us']:6.1f} us, "
              f"p10 {cpu['p10_us']:6.1f} us, repeats {cpu['repeat_medians_us']}; "
              f"wall median {wall['median_us']:6.1f} us; "
              f"{r['launches']} launches, {r['allocations']} allocations, {r['aten_ops']} aten ops")
    if args.save:
        save(result, args.label, args.save)
        print(f"saved under {args.label!r} in {args.save} (+ {args.save.with_suffix('.md').name})")


if __name__ == "__main__":
    main()
