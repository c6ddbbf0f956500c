"""``lens-study``: every requested mode for N seeds from matched starts, with intervals.

Each seed warm-starts once (``STUDY_DIR/DIFFICULTY/seed_S/start``) and every mode trains from
that start with the same RL seed, one unit of work per (seed, mode).  ``--jobs N`` runs N
units side by side in worker processes (``study_worker``); ``--jobs 1`` runs them in this
process.  Running the same command again resumes: finished units are skipped, interrupted
ones continue from their latest checkpoint (the trainer's exact resume), so the results equal
an uninterrupted study's.  The results for any ``--jobs`` are identical (``cpu_threads`` is
fixed, 1 by default).  At the end (and with ``--report-only``) the finished runs are summarised
into ``REPORT_DIR/study-DIFFICULTY.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import fcntl
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .checkpoint import atomic_write_text
from .config import MODES, TrainConfig, add_config_flags, flag_overrides, load_yaml, resolve_config
from .metrics import read_metrics
from .study_worker import is_done, log_path, logging_to, run_unit

# Study settings laid over the embedded default (below a YAML file and flags): one thread per
# run so that --jobs changes nothing in the results, checkpoints often enough to lose little
# to a kill, no progress bars (the study prints its own progress).
STUDY_DEFAULTS: dict[str, Any] = {"cpu_threads": 1, "save_every": 25, "progress": False}
# The task's difficulties: "hard" warm-starts for 50 steps instead of 150, which leaves about
# 75% of the groups negative at the start (about 45% after 150 steps).
DIFFICULTIES: dict[str, dict[str, Any]] = {"default": {}, "hard": {"warm_start_steps": 50}}
FIXED = ("seed", "run_dir", "modes")  # set by the study for each seed


@dataclass(frozen=True)
class Unit:
    """A seed's warm start (``mode`` None) or one mode's training, in ``seed_dir``."""

    seed: int
    mode: Optional[str]
    seed_dir: Path

    @property
    def name(self) -> str:
        return f"seed {self.seed} {self.mode or 'warm start'}"


def seed_config(values: dict[str, Any], seed: int, seed_dir: Path, modes: Sequence[str]) -> TrainConfig:
    return resolve_config(None, {**values, "seed": seed, "run_dir": str(seed_dir),
                                 "modes": list(modes)})


def plan(study_dir: Path, seeds: Sequence[int], modes: Sequence[str],
         values: dict[str, Any]) -> tuple[list[Unit], TrainConfig]:
    """Save every seed's options (refusing to resume a study made with other options) and
    list the units, seed by seed: the warm start, then each mode."""
    from .trainer import _check_resumable

    units, config = [], None
    for seed in seeds:
        seed_dir = study_dir / f"seed_{seed}"
        config = seed_config(values, seed, seed_dir, modes)
        seed_dir.mkdir(parents=True, exist_ok=True)
        _check_resumable(seed_dir, config)
        atomic_write_text(seed_dir / "config.yaml", config.to_yaml())
        units.append(Unit(seed, None, seed_dir))
        units += [Unit(seed, mode, seed_dir) for mode in modes]
    return units, config


def _progress(unit: Unit, steps: int) -> str:
    records = read_metrics(unit.seed_dir / unit.mode / "metrics.jsonl") if unit.mode else []
    done = max((r["step"] for r in records), default=0)
    return f"{unit.name} step {done}/{steps}"


def _finished_line(unit: Unit, seconds: float) -> str:
    if unit.mode is None:
        return f"{unit.name} done ({seconds:.0f} s)"
    evals = [r for r in read_metrics(unit.seed_dir / unit.mode / "metrics.jsonl")
             if "eval/pass@1" in r]
    gain = (f": pass@1 {evals[0]['eval/pass@1']:.3f} -> {evals[-1]['eval/pass@1']:.3f}"
            if len(evals) >= 2 else "")
    return f"{unit.name} done{gain} ({seconds:.0f} s)"


def execute(units: Sequence[Unit], steps: int, jobs: int, heartbeat: float,
            say: Callable[[str], None]) -> list[Unit]:
    """Run the unfinished units, at most ``jobs`` at a time (a mode waits for its seed's warm
    start); returns the units that failed (their log names the reason)."""
    todo = [u for u in units if not is_done(u.seed_dir, u.mode, steps)]
    total, failed = len(todo), []
    say(f"{len(units) - total} of {len(units)} units already done, {total} to run")
    if jobs == 1:
        return _execute_here(todo, steps, heartbeat, say)
    running: dict[Unit, tuple[subprocess.Popen, float]] = {}
    finished = 0
    last_beat = time.monotonic()
    try:
        while todo or running:
            blocked = {u.seed for u in failed if u.mode is None}
            for unit in [u for u in todo if u.seed in blocked]:
                todo.remove(unit)
                failed.append(unit)
                say(f"{unit.name} skipped: its warm start failed")
            for unit in list(todo):
                if len(running) >= jobs:
                    break
                if unit.mode is not None and not is_done(unit.seed_dir, None, steps):
                    continue  # its seed's warm start is still running
                todo.remove(unit)
                running[unit] = (_spawn(unit), time.monotonic())
                say(f"{unit.name} started")
            time.sleep(0.2)
            for unit, (proc, began) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[unit]
                finished += 1
                if proc.returncode == 0:
                    say(f"[{finished}/{total}] " + _finished_line(unit, time.monotonic() - began))
                else:
                    failed.append(unit)
                    say(f"[{finished}/{total}] {unit.name} FAILED (exit {proc.returncode}); "
                        f"see {log_path(unit.seed_dir, unit.mode)}")
            if running and time.monotonic() - last_beat >= heartbeat:
                last_beat = time.monotonic()
                say("running: " + ", ".join(_progress(u, steps) for u in running))
    finally:
        for proc, _ in running.values():
            proc.terminate()
        for proc, _ in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return failed


def _spawn(unit: Unit) -> subprocess.Popen:
    path = log_path(unit.seed_dir, unit.mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        argv = [sys.executable, "-m", "lens_kernels.train.study_worker", str(unit.seed_dir)]
        return subprocess.Popen(argv + ([unit.mode] if unit.mode else []), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _execute_here(todo: Sequence[Unit], steps: int, heartbeat: float,
                  say: Callable[[str], None]) -> list[Unit]:
    failed: list[Unit] = []
    for i, unit in enumerate(todo, 1):
        if any(f.seed == unit.seed and f.mode is None for f in failed):
            failed.append(unit)
            say(f"{unit.name} skipped: its warm start failed")
            continue
        say(f"{unit.name} started")
        stop = threading.Event()
        beat = threading.Thread(target=_beat, args=(unit, steps, heartbeat, stop, say),
                                daemon=True)
        beat.start()
        began = time.monotonic()
        try:
            with logging_to(log_path(unit.seed_dir, unit.mode)):
                run_unit(unit.seed_dir, unit.mode)
        except Exception as e:  # noqa: BLE001 - reported, the other seeds go on
            failed.append(unit)
            say(f"[{i}/{len(todo)}] {unit.name} FAILED: {type(e).__name__}: {e}")
            continue
        finally:
            stop.set()
            beat.join()
        say(f"[{i}/{len(todo)}] " + _finished_line(unit, time.monotonic() - began))
    return failed


def _beat(unit: Unit, steps: int, every: float, stop: threading.Event, say) -> None:
    while not stop.wait(every):
        if unit.mode is not None:
            say("running: " + _progress(unit, steps))


def parse_seeds(text: str) -> list[int]:
    """``"8"`` -> seeds 0..7; ``"3-5"`` -> 3, 4, 5; ``"0,2,7"`` -> those."""
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        elif "-" in text.strip("-"):
            first, last = (int(s) for s in text.split("-"))
            seeds = list(range(first, last + 1))
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise ValueError(f"--seeds: expected a count (8), a range (3-5) or a list (0,2,7), "
                         f"got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds: expected distinct seeds >= 0, got {text!r}")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-study",
        description="Train every mode for N seeds from matched starts (one warm start per seed, "
        "the same RL seed for every mode), resumably, then report per-mode means with 95% "
        "intervals and paired differences against grpo.  Any lens-train option may be given "
        "(the same for every mode), except --seed and --run-dir.",
    )
    parser.add_argument("--difficulty", default="default", choices=sorted(DIFFICULTIES),
                        help="task difficulty: default, or hard (50 warm-start steps instead of "
                        "150: about 75%% of the groups negative at the start)")
    parser.add_argument("--seeds", default="8", help="a count (8: seeds 0-7), a range (3-5) or "
                        "a list (0,2,7) (default 8)")
    parser.add_argument("--modes", dest="study_modes", metavar="MODES", default="lens,grpo",
                        help=f"modes to compare, from {', '.join(MODES)} (default lens,grpo)")
    parser.add_argument("--jobs", type=int, default=1, help="units run side by side in worker "
                        "processes; 1 runs them in this process (default 1)")
    parser.add_argument("--study-dir", default="runs/study", help="runs go to "
                        "STUDY_DIR/DIFFICULTY/seed_S (default runs/study)")
    parser.add_argument("--report-dir", help="where study-DIFFICULTY.{json,md,png} go "
                        "(default STUDY_DIR/DIFFICULTY)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing; summarise the runs that finished")
    parser.add_argument("--heartbeat", type=float, default=60.0,
                        help="seconds between progress lines of the running units (default 60)")
    parser.add_argument("--config", help="YAML file of lens-train options (flags override it)")
    add_config_flags(parser, [n for n in TrainConfig.__dataclass_fields__ if n not in FIXED])
    return parser


def study_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
        modes = [m for m in args.study_modes.split(",") if m.strip()]
        TrainConfig(modes=modes)  # validates the names
    except ValueError as e:
        parser.error(str(e))
    if args.jobs < 1:
        parser.error(f"--jobs: expected >= 1, got {args.jobs}")
    if args.heartbeat <= 0:
        parser.error(f"--heartbeat: expected > 0, got {args.heartbeat}")
    values = {**STUDY_DEFAULTS, **DIFFICULTIES[args.difficulty]}
    values.update(load_yaml(args.config) if args.config else {})
    values.update(flag_overrides(args))
    study_dir = Path(args.study_dir) / args.difficulty
    report_dir = Path(args.report_dir) if args.report_dir else study_dir
    study_dir.mkdir(parents=True, exist_ok=True)

    def say(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    with open(study_dir / ".study.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            parser.error(f"another lens-study is running in {study_dir}")
        try:
            units, config = plan(study_dir, seeds, modes, values)
        except ValueError as e:  # options that do not resolve, or differ from the saved ones
            parser.error(str(e))
        say(f"lens-study {args.difficulty}: seeds {args.seeds} x modes {', '.join(modes)}, "
            f"{config.steps} RL steps each, {args.jobs} job(s); runs in {study_dir}")
        failed = []
        if not args.report_only:
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
            failed = execute(units, config.steps, args.jobs, args.heartbeat, say)
        from .study_report import write_report

        paths = write_report(study_dir, seeds, modes, config, args.difficulty, report_dir)
    say("report: " + ", ".join(str(p) for p in paths))
    if failed:
        say(f"{len(failed)} unit(s) failed: " + "; ".join(u.name for u in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(study_main())
