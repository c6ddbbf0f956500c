"""Atomic checkpoints: model, tokenizer, optimizer, RNG states, step and data position.

A checkpoint is written to a temporary folder in the same directory, flushed to disk, then
renamed into place (``os.replace`` is atomic), and only then is ``latest`` repointed (also by an
atomic rename) and are old checkpoints pruned.  A run killed at any instant therefore leaves
the previous checkpoint intact and ``latest`` naming a complete one.

Each checkpoint lists its files and their sizes in ``manifest.json``, written last.  On resume
(``resume_point``) a checkpoint that is missing, truncated or unreadable is never trained over:
the newest intact one is used instead, and the damaged ones are renamed ``damaged-step_*`` and
kept; when none is intact, ``CheckpointError`` names the files and the ways forward.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import struct
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"step_(\d+)")
log = logging.getLogger("lens_kernels.train")


class CheckpointError(RuntimeError):
    """A run directory whose checkpoints cannot be resumed; it is left as it is."""


@contextlib.contextmanager
def quiet_transformers():
    """transformers' progress bars ("Writing model shards", "Loading weights") off for the
    block: they would interleave with the trainer's own bar at every checkpoint."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model(folder: Path, model, tokenizer, extra_files: Optional[dict[str, str]] = None) -> None:
    """``save_pretrained`` of model and tokenizer into ``folder``, atomically."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with quiet_transformers():
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    _write_manifest(tmp)
    _replace_dir(tmp, folder)


def _write_manifest(folder: Path) -> None:
    """``manifest.json``: every file's size, written last; then the whole folder fsynced."""
    sizes = {str(p.relative_to(folder)): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps(sizes, indent=1) + "\n", encoding="utf-8")
    _fsync_tree(folder)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final``; an older ``final`` is removed only after."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if old.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    ckpt_dir: Path, step: int, model, tokenizer, optimizer, trainer_state: dict[str, Any],
    keep: int, config_yaml: str,
) -> Path:
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp = ckpt_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with quiet_transformers():
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    (tmp / "lens_train_config.yaml").write_text(config_yaml, encoding="utf-8")
    state = dict(trainer_state, step=step, optimizer=optimizer.state_dict(), rng=rng_state())
    torch.save(state, tmp / STATE_FILE)
    _write_manifest(tmp)
    final = ckpt_dir / name
    _replace_dir(tmp, final)
    atomic_write_text(ckpt_dir / "latest", name + "\n")
    done = [p for p in step_dirs(ckpt_dir) if p != final and _step(p) < step]
    for old in done[max(1, keep) - 1:]:
        shutil.rmtree(old)
    return final


def _step(path: Path) -> int:
    return int(STEP_DIR.fullmatch(path.name).group(1))


def step_dirs(ckpt_dir: Path) -> list[Path]:
    """The checkpoint folders ``step_N`` of ``ckpt_dir``, newest first."""
    found = [p for p in Path(ckpt_dir).glob("step_*") if STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=_step, reverse=True)


def _safetensors_problem(path: Path) -> Optional[str]:
    """Why a ``.safetensors`` file is truncated or malformed (its header gives its length)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path}: {size} bytes, too short for a header"
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            return f"{path}: {size} bytes, shorter than its {length}-byte header"
        try:
            header = json.loads(f.read(length))
            end = max([t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"],
                      default=0)
        except (ValueError, KeyError, TypeError, IndexError) as err:
            return f"{path}: unreadable header ({err})"
    if 8 + length + end != size:
        return f"{path}: {size} bytes; its header says {8 + length + end} (truncated?)"
    return None


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why the checkpoint folder ``path`` cannot be resumed from, naming the file (None: intact).

    Checks that the folder exists; that every file of ``manifest.json`` is there with its size
    (folders written before manifests: none); that each ``.safetensors`` file is as long as its
    header says.  ``load_trainer_state`` checks the rest of a checkpoint.
    """
    path = Path(path)
    if not path.is_dir():
        return f"{path}: missing"
    manifest = path / MANIFEST
    try:
        sizes = json.loads(manifest.read_text(encoding="utf-8")) if manifest.exists() else {}
    except ValueError as err:
        return f"{manifest}: unreadable ({err})"
    if not isinstance(sizes, dict):
        return f"{manifest}: expected an object of file sizes"
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            return f"{file}: missing"
        if file.stat().st_size != size:
            return f"{file}: {file.stat().st_size} bytes, {MANIFEST} says {size} (truncated?)"
    for file in sorted(path.glob("*.safetensors")):
        problem = _safetensors_problem(file)
        if problem:
            return problem
    return None


def load_trainer_state(path: Path) -> dict[str, Any]:
    """``trainer_state.pt`` of the checkpoint ``path``; ``CheckpointError`` naming the file."""
    file = Path(path) / STATE_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises RuntimeError, EOFError, pickle errors, ...
        raise CheckpointError(f"{file}: cannot be read ({type(err).__name__}: {err})") from err


class ResumePoint(NamedTuple):
    path: Path
    state: dict[str, Any]


def _quarantine(path: Path) -> Path:
    """Rename a damaged checkpoint ``damaged-step_N`` (``-2``, ... if taken): kept, never pruned,
    never trained over."""
    target, n = path.with_name(f"damaged-{path.name}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"damaged-{path.name}-{n}")
    os.replace(path, target)
    return target


def resume_point(ckpt_dir: Path) -> Optional[ResumePoint]:
    """The newest intact checkpoint of ``ckpt_dir`` and its trainer state; None for a fresh run
    (no ``latest`` and no ``step_*`` folder).

    A checkpoint that ``latest`` names but is missing, and newer ones that are damaged, are
    reported in the log, which names the checkpoint resumed from; the damaged ones are renamed
    ``damaged-step_N`` and kept.  When no checkpoint is intact, ``CheckpointError`` says why for
    each and what to do, and nothing in ``ckpt_dir`` is changed.
    """
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / "latest"
    named = pointer.read_text(encoding="utf-8").strip() if pointer.exists() else None
    candidates = step_dirs(ckpt_dir)
    if named is None and not candidates:
        return None
    problems, damaged = [], []
    if named is not None and not (ckpt_dir / named).is_dir():
        problems.append(f"{pointer} names {named!r}, which is missing")
    for path in candidates:
        problem = checkpoint_problem(path)
        try:
            state = load_trainer_state(path) if problem is None else None
        except CheckpointError as err:
            problem = str(err)
        if problem is not None:
            problems.append(problem)
            damaged.append(path)
            continue
        for message in problems:
            log.warning("%s", message)
        for bad in damaged:
            log.warning("%s is damaged; kept as %s", bad, _quarantine(bad).name)
        if problems or path.name != named:
            log.warning("resuming from %s, the newest intact checkpoint (%s)", path,
                        f"latest names {named}" if named else "there is no latest")
        return ResumePoint(path, state)
    listed = "".join(f"\n  {message}" for message in problems)
    raise CheckpointError(
        f"{ckpt_dir}: no intact checkpoint to resume from; left as it is:{listed}\n"
        f"To go on: restore the damaged files; or train into another --run-dir; or move {ckpt_dir} "
        f"and {ckpt_dir.parent / 'metrics.jsonl'} away to train this mode again from the start."
    )
