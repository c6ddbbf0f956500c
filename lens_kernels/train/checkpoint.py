"""Atomic checkpoints: model, tokenizer, optimizer, RNG states, step and data position.

A checkpoint is written to a temporary folder in the same directory, flushed to disk, then
renamed into place (``os.replace`` is atomic), and only then is ``latest`` repointed (also by an
atomic rename) and are old checkpoints pruned.  A run killed at any instant therefore leaves
the previous checkpoint intact and ``latest`` naming a complete one.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


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
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    _fsync_tree(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


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
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "lens_train_config.yaml").write_text(config_yaml, encoding="utf-8")
    state = dict(trainer_state, step=step, optimizer=optimizer.state_dict(), rng=rng_state())
    torch.save(state, tmp / STATE_FILE)
    _fsync_tree(tmp)
    final = ckpt_dir / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_dir / "latest", name + "\n")
    done = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and p != final)
    for old in done[: max(0, len(done) - max(1, keep) + 1)]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    pointer = Path(ckpt_dir) / "latest"
    if not pointer.exists():
        return None
    path = Path(ckpt_dir) / pointer.read_text(encoding="utf-8").strip()
    return path if (path / STATE_FILE).exists() else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)
