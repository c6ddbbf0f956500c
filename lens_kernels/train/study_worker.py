"""One unit of a study: a seed's warm start, or one mode trained from it.

Run in the study's process (``--jobs 1``) or as ``python -m lens_kernels.train.study_worker
SEED_DIR [MODE]`` (``--jobs`` > 1).  The options are those the study saved in
``SEED_DIR/config.yaml``.  A lock file keeps two processes from running the same unit; a
finished mode leaves ``SEED_DIR/MODE/done.json`` (with its step count), a finished warm start
``SEED_DIR/start/config.json``.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

from .checkpoint import atomic_write_text
from .config import TrainConfig, load_yaml

DONE_FILE = "done.json"


class Busy(RuntimeError):
    """Another process holds the unit's lock."""


def seed_config(seed_dir: Path) -> TrainConfig:
    return TrainConfig.from_dict(load_yaml(str(Path(seed_dir) / "config.yaml")))


def is_done(seed_dir: Path, mode: Optional[str], steps: int) -> bool:
    """Whether the unit finished (a mode: with ``steps`` steps)."""
    seed_dir = Path(seed_dir)
    if mode is None:
        return (seed_dir / "start" / "config.json").exists()
    marker = seed_dir / mode / DONE_FILE
    return marker.exists() and json.loads(marker.read_text(encoding="utf-8"))["steps"] == steps


def log_path(seed_dir: Path, mode: Optional[str]) -> Path:
    return Path(seed_dir) / (f"{mode}.log" if mode else "start.log")


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"{path}: another process is running this unit") from None
        yield


def run_unit(seed_dir: Path, mode: Optional[str]) -> None:
    """The warm start (``mode`` None) or the training of ``mode``; no-op when already done."""
    from .rewards import make_verifier
    from .trainer import prepare_start, setup, train_mode

    seed_dir = Path(seed_dir)
    config = seed_config(seed_dir)
    with _lock(seed_dir / f".{mode or 'start'}.lock"):
        if is_done(seed_dir, mode, config.steps):
            return
        setup(config)
        start = prepare_start(config, seed_dir)
        if mode is None:
            return
        began = time.perf_counter()
        verifier = make_verifier(config.verifier, config)
        try:
            train_mode(config, mode, start, seed_dir / mode, verifier)
        finally:
            verifier.close()
        atomic_write_text(seed_dir / mode / DONE_FILE, json.dumps(
            {"steps": config.steps, "seconds": round(time.perf_counter() - began, 1)}) + "\n")


@contextlib.contextmanager
def logging_to(path: Path) -> Iterator[None]:
    """The trainer's log, warnings and library output of the block go to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("lens_kernels.train")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addHandler(handler)
    try:
        with open(path, "a", encoding="utf-8") as out, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(out):
            yield
    finally:
        logging.getLogger("py.warnings").removeHandler(handler)
        logging.captureWarnings(False)
        logger.removeHandler(handler)
        handler.close()


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds, so verifier workers and files are closed


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2):
        print("usage: python -m lens_kernels.train.study_worker SEED_DIR [MODE]", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    seed_dir, mode = Path(argv[0]), (argv[1] if len(argv) == 2 else None)
    try:
        with logging_to(log_path(seed_dir, mode)):
            run_unit(seed_dir, mode)
    except Busy as e:
        print(e, file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
