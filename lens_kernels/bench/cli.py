"""``lens-bench`` / ``python -m lens_kernels bench``: the benchmark command line.

Presets fix shapes, policies, modes, implementations and timing; every option overrides its
part.  ``--summarize`` prints the compact table and the targets of saved runs (what
``scripts/gpu_bench.sh`` prints last).
``quick`` is what ``python -m lens_kernels`` runs with no arguments; it prints its table and
writes no files unless given ``--save`` (the other presets write JSON, markdown and a PNG into
``--out``).  The CLI sets ``KINETO_LOG_LEVEL`` (unless set) so that the profiler measuring CPU
memory prints none of its ``USDT: profiler_start/stop`` lines.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import textwrap
import time
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import report, runner, summary, targets
from .measure import Timer, copy_bandwidth, default_copy_bytes
from .plot import plot
from .plans import CPU_TARGET, H100_TARGET, PRESETS, Preset, best_device, grid, preset
from .problems import DTYPES, POLICIES, shape_for_tokens
from .registry import MODES, REGISTRY, select


def _list(kind):
    return lambda text: [kind(item) for item in text.split(",") if item]


def _names(values) -> str:
    return ", ".join(values)


def _shape(case: tuple) -> str:
    dtype, vocab, tokens = case
    return f"{dtype} V={vocab} N={tokens}"


def _preset_help(default_preset: str) -> str:
    """What each preset measures, with its shapes on the CPU and on a GPU."""
    cpu, gpu = PRESETS["cpu"], PRESETS["cuda"]
    lines = {
        "quick": f"one small problem ({_shape(cpu['quick'].cases[0])} on the CPU, "
                 f"{_shape(gpu['quick'].cases[0])} on a GPU), fused vs the eager reference; "
                 "writes no files unless --save",
        "sweep": "every vocabulary, token count and dtype of the device's plan",
        "target": f"the one shape the performance targets are set for ({_shape(CPU_TARGET)} on "
                  f"the CPU, {_shape(H100_TARGET)} on a GPU), with each target met or missed",
        "suite": "the shapes of the pytest-benchmark suite in benchmarks/",
    }
    return "; ".join(f"{name}{' (default)' if name == default_preset else ''}: {text}"
                     for name, text in lines.items())


def parser(prog: str, default_preset: str = "sweep") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=(
        "Benchmark the fused LENS loss against the eager and compiled PyTorch reference and Liger-Kernel: "
        "forward and forward+backward time, host time, peak memory, distance to the two bandwidth floors, "
        "error against the float64 reference.  Options left out take the preset's values."))
    p.add_argument("--device", default="auto", help="auto (cuda when present), cuda, cuda:1, cpu")
    p.add_argument("--preset", choices=tuple(PRESETS["cpu"]), default=None, help=_preset_help(default_preset))
    p.add_argument("--vocab", type=_list(int), help="vocabulary sizes, comma-separated")
    p.add_argument("--tokens", type=_list(int), help="token counts N = B*T, comma-separated")
    p.add_argument("--dtype", type=_list(str), help=f"logits dtypes, comma-separated: {_names(DTYPES)}")
    p.add_argument("--modes", type=_list(str), help=f"loss modes, comma-separated: {_names(MODES)}")
    p.add_argument("--policy", type=_list(str), help=f"policies, comma-separated: {_names(POLICIES)} (on: the old "
                   "log-probs are the current ones; off: the policy's log-probs plus noise, so some tokens clip)")
    p.add_argument("--impl", type=_list(str), help="implementations, comma-separated ('fused' = the "
                   f"auto backend): {_names(REGISTRY)}; --list says which run here")
    p.add_argument("--group-size", type=int, help="G, rows per prompt group")
    p.add_argument("--rows", type=int, help="B (default: two groups, more when T would exceed 4096)")
    p.add_argument("--warmup", type=int, help="untimed calls before timing each measurement")
    p.add_argument("--min-runs", type=int, help="fewest timed calls per measurement, even past --budget")
    p.add_argument("--max-runs", type=int, help="most timed calls per measurement, even within --budget")
    p.add_argument("--budget", type=float, help="seconds of timed runs per measurement")
    p.add_argument("--copies", type=int, default=3, help="input copies rotated between runs (fewer if memory is short)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--threads", type=int, help="torch CPU threads (torch.set_num_threads); default: torch's own")
    p.add_argument("--time-limit", type=float, help="seconds after which no new measurement starts (the rest "
                   "are recorded as skipped, and the results written)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON, markdown and PNG")
    p.add_argument("--name", help="file stem (default: <device>-<preset>)")
    p.add_argument("--save", action=argparse.BooleanOptionalAction, default=None,
                   help="write JSON, markdown and PNG into --out (default: yes, except for the quick preset)")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write the PNG")
    p.add_argument("--list", action="store_true", help="list the implementations, whether each runs here, and exit")
    p.add_argument("--summarize", type=Path, nargs="+", metavar="JSON",
                   help="print the compact table and targets of saved runs (first file wins on overlaps), and exit")
    return p


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return best_device()
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device here")
    return device


def list_impls(device: torch.device) -> str:
    lines = []
    for impl in REGISTRY.values():
        reason = impl.unavailable(device)
        status = f"{impl.name:<19} {'runs here' if reason is None else 'not here: ' + reason}"
        lines += [textwrap.fill(status, 100, subsequent_indent=" " * 20),
                  textwrap.fill(impl.computes, 100, initial_indent=" " * 4, subsequent_indent=" " * 4,
                                break_on_hyphens=False)]
    return "\n".join(lines)


def _shapes(plan: Preset, args: argparse.Namespace) -> list:
    """The plan's shapes, or the grid of the values given (the plan's for the others)."""
    cases = plan.cases
    if args.dtype or args.vocab or args.tokens:
        dtypes, vocabs, tokens = (sorted({case[i] for case in cases}) for i in range(3))
        cases = grid(args.dtype or dtypes, args.vocab or vocabs, args.tokens or tokens)
    rows = args.rows or (None if args.group_size else plan.rows)
    return [shape_for_tokens(n, v, DTYPES[d], args.group_size or plan.group_size, rows) for d, v, n in cases]


@dataclass(frozen=True)
class Run:
    """What one benchmark run measured, and where."""

    records: list
    env: dict
    computes: dict
    out: Path
    stem: str
    save: bool


def measure(args: argparse.Namespace, argv: list[str], prog: str, default_preset: str,
            progress: bool = True) -> Run:
    """Run the benchmark the parsed options describe (``progress``: a line per measurement on
    stderr); option errors exit with a message."""
    started = time.monotonic()
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # above USDT (5): no profiler_start/stop lines
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset_name = args.preset or default_preset
    plan = preset(preset_name, device)
    for dtype in args.dtype or ():
        if dtype not in DTYPES:
            raise SystemExit(f"--dtype: unknown {dtype!r}; known: {_names(DTYPES)}")
    for mode in args.modes or ():
        if mode not in MODES:
            raise SystemExit(f"--modes: unknown {mode!r}; known: {_names(MODES)}")
    for policy in args.policy or ():
        if policy not in POLICIES:
            raise SystemExit(f"--policy: unknown {policy!r}; known: {_names(POLICIES)}")
    try:
        shapes = _shapes(plan, args)
        impls = select(args.impl or list(plan.impls), device)
    except ValueError as err:
        raise SystemExit(str(err))
    options = dict(warmup=args.warmup, min_runs=args.min_runs, max_runs=args.max_runs, budget_s=args.budget)
    timer = Timer(device, **{**plan.timer, **{k: v for k, v in options.items() if v is not None}})
    if progress:
        runner.log(f"measuring the copy bandwidth of {device} ...")
    bandwidth = copy_bandwidth(timer, default_copy_bytes(device))
    deadline = None if args.time_limit is None else started + args.time_limit
    settings = runner.Settings(timer, bandwidth, copies=max(1, args.copies), seed=args.seed, deadline=deadline,
                               progress=progress)
    command = f"{prog} {shlex.join(argv)}".strip()
    env = report.environment(device, command, bandwidth, timer)
    if progress:
        runner.log(f"{env['device']}: torch {env['torch']}, triton {env['triton']}; "
                   f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    computes = {impl.name: impl.computes for impl in impls}
    save = args.save if args.save is not None else plan.save
    stem = args.name or f"{report.device_slug(device)}-{preset_name}"
    partial = _partial_writer(args.out / f"{stem}.json", env, computes) if save else None
    records = runner.run(shapes, list(args.modes or plan.modes), impls, settings, on_record=partial,
                         policies=tuple(args.policy or plan.policies))
    return Run(records, env, computes, args.out, stem, save)


def write(run: Run, plot_it: bool) -> list[Path]:
    """The run's JSON, markdown and (``plot_it``) PNG in ``run.out``."""
    verdicts = targets.evaluate(run.records, run.env["device_type"])
    png = plot(run.records, run.out / f"{run.stem}.png", run.env["device"]) if plot_it else None
    paths = report.write(run.out, run.stem, run.records, run.env, run.computes, verdicts, png.name if png else None)
    return paths + ([png] if png else [])


def failed(records: list[dict]) -> bool:
    return any(r["status"] in ("failed-check", "error") for r in records)


def main(argv: Optional[list[str]] = None, prog: str = "lens-bench", default_preset: str = "sweep") -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser(prog, default_preset).parse_args(argv)
    if args.summarize:
        print(summary.summarize(args.summarize))
        return 0
    if args.list:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(list_impls(resolve_device(args.device)))
        return 0
    run = measure(args, argv, prog, default_preset)
    verdicts = targets.evaluate(run.records, run.env["device_type"])
    print(f"lens-kernels benchmark on {run.env['device']} ({run.env['command']})")
    print(report.terminal(run.records, run.env, run.computes, verdicts))
    if run.save:
        print("\nwrote " + ", ".join(str(p) for p in write(run, args.plot)))
    else:
        print(f"\nno files written (--save writes JSON, markdown and PNG into {args.out})")
    return 1 if failed(run.records) else 0


def _partial_writer(path: Path, env: dict, computes: dict):
    """An ``on_record`` callback that rewrites ``path`` with the records so far (marked
    partial), so that a run stopped from outside still leaves its measurements."""
    records: list[dict] = []

    def write(record: dict) -> None:
        records.append(record)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = dict(environment=env, implementations=computes, partial=True, results=records)
        path.write_text(json.dumps(payload, indent=1) + "\n")

    return write
