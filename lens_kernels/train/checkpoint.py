"""Atomic checkpoints: model, tokenizer, optimizer, RNG states, step and data position.

A checkpoint is written to a temporary folder in the same directory, flushed to disk, then
renamed into place (``os.replace`` is atomic), and only then is ``latest`` repointed (also by an
atomic rename) and are old checkpoints pruned.  A run killed at any instant therefore leaves
the previous checkpoint intact and ``latest`` naming a complete one.

Each checkpoint lists its files with their sizes and content hashes in ``manifest.json``,
written last: xxHash's XXH3-128 (``xxhash``; SHA-256 where it is not installed) of each file.
The optimizer state is hashed as it is written; the model files are read back through
``mmap`` from the page cache by a background thread meanwhile.  On resume (``resume_point``) a checkpoint
that is missing, truncated, unreadable or changed on disk (a hash that differs, even at the same
size) is never trained over: the newest intact one is used instead, and the damaged ones are
renamed ``damaged-step_*`` and kept; when none is intact, ``CheckpointError`` names the files
and the ways forward.  Checkpoints written before content hashes are checked by size, with a
one-line notice.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import mmap
import os
import random
import re
import shutil
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2  # 1 (no "format" key): {file: size}; 2: sizes and content hashes
# XXH3-128 hashes ~18 GB/s from the page cache on one core (SHA-256 ~1.8 GB/s): the content hashes
# cost about 4 % of a save (docs/trainer.md, benchmarks/results/checkpoint-hash-cpu.json).
HASH = "xxh3_128" if importlib.util.find_spec("xxhash") else "sha256"
HASH_BLOCK = 16 * 2**20
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
    with _Hashes() as hashes:
        _write_manifest(tmp, hashes)
    _replace_dir(tmp, folder)


def _hasher(name: str):
    """A new hash object of kind ``name`` (``xxh3_128`` or a ``hashlib`` name); None when this
    Python cannot compute it (``xxhash`` not installed, an unknown name)."""
    if name == "xxh3_128":
        if importlib.util.find_spec("xxhash") is None:
            return None
        import xxhash

        return xxhash.xxh3_128()
    try:
        return hashlib.new(name)
    except (ValueError, TypeError):
        return None


def file_hash(path: Path, name: str) -> str:
    """The ``name`` hash (``HASH`` for new manifests) of a file's bytes, hex: read through
    ``mmap`` in ``HASH_BLOCK`` blocks (no copy; the hash releases the GIL, so other threads go
    on)."""
    digest = _hasher(name)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                view = memoryview(mapped)
                try:
                    for start in range(0, len(view), HASH_BLOCK):
                        digest.update(view[start:start + HASH_BLOCK])
                finally:
                    view.release()
    return digest.hexdigest()


class _HashingWriter(io.RawIOBase):
    """A file open for writing that hashes every byte on its way to the file."""

    def __init__(self, file, digest) -> None:
        super().__init__()
        self._file, self._digest = file, digest

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._digest.update(data)
        return self._file.write(data)


class _Hashes:
    """Content hashes of a folder's files, computed by one background thread while the caller
    goes on writing (it reads the files back from the page cache), or while they are written
    (``torch_save``).  ``add(folder)`` queues every file not yet hashed; ``of(folder)`` waits
    for them all.  A context manager: leaving it cancels what is still queued."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lens-checkpoint-hash")
        self._jobs: dict[Path, Future] = {}

    def __enter__(self) -> "_Hashes":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def add(self, folder: Path) -> None:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path not in self._jobs:
                self._jobs[path] = self._pool.submit(file_hash, path, HASH)

    def torch_save(self, obj, path: Path) -> None:
        """``torch.save(obj, path)``, hashed as it is written (the largest file of a checkpoint,
        the optimizer state, is never read back)."""
        digest = _hasher(HASH)
        with open(path, "wb") as file:
            torch.save(obj, _HashingWriter(file, digest))
        self._jobs[path] = Future()
        self._jobs[path].set_result(digest.hexdigest())

    def of(self, folder: Path) -> dict[Path, str]:
        self.add(folder)
        return {path: job.result() for path, job in self._jobs.items()}


def _write_manifest(folder: Path, hashes: _Hashes) -> None:
    """``manifest.json``: every file's size and content hash, written last.  The files are
    fsynced while the hashes complete, then the manifest is written and fsynced."""
    hashes.add(folder)
    _fsync_tree(folder)
    files = {str(path.relative_to(folder)): {"size": path.stat().st_size, HASH: digest}
             for path, digest in sorted(hashes.of(folder).items())}
    manifest = {"format": MANIFEST_FORMAT, "hash": HASH, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    with open(folder / MANIFEST, "rb") as f:
        os.fsync(f.fileno())


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
    with _Hashes() as hashes:
        hashes.add(tmp)  # the model files are hashed while the optimizer state is written
        hashes.torch_save(state, tmp / STATE_FILE)
        _write_manifest(tmp, hashes)
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


def _manifest_files(path: Path, notice: bool = True) -> tuple[Optional[dict[str, dict]], Optional[str], Optional[str]]:
    """``(files, hash, problem)``: the manifest's ``{name: {"size": n, hash: hex}}`` and the kind
    of hash to check (None: sizes only, for manifests written before content hashes, or hashes
    this Python cannot compute; with ``notice``, a one-line notice says so); ``{}`` without a
    manifest."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return {}, None, None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except ValueError as err:
        return None, None, f"{manifest}: unreadable ({err})"
    if isinstance(data, dict) and "format" not in data and all(isinstance(v, int) for v in data.values()):
        if notice:
                log.info("%s: no content hashes (written before lens-kernels recorded them); checked by "
                     "file size only", manifest)
        return {name: {"size": size} for name, size in data.items()}, None, None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) and isinstance(v.get("size"), int)
                                              for v in files.values()):
        return None, None, f"{manifest}: expected {{'format': {MANIFEST_FORMAT}, 'files': {{name: {{'size': ...}}}}}}"
    kind = data.get("hash")
    if not isinstance(kind, str) or _hasher(kind) is None:
        if notice:
            log.info("%s: content hashes of kind %r, which this Python cannot compute (for xxh3_128: "
                     "pip install xxhash); checked by file size only", manifest, kind)
        kind = None
    return files, kind, None


def checkpoint_problem(path: Path, contents: bool = True) -> Optional[str]:
    """Why the checkpoint folder ``path`` cannot be resumed from, naming the file (None: intact).

    Checks that the folder exists; that every file of ``manifest.json`` is there with its size;
    that each ``.safetensors`` file is as long as its header says; then, with ``contents``, that
    every file's content hash is the recorded one (bytes changed on disk at the same size:
    :func:`content_problem`).  Folders written before manifests have none of these but the
    header check; manifests written before content hashes, all but the last.
    ``load_trainer_state`` checks the rest of a checkpoint.
    """
    path = Path(path)
    if not path.is_dir():
        return f"{path}: missing"
    files, _, problem = _manifest_files(path)
    if problem:
        return problem
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{file}: missing"
        if file.stat().st_size != entry["size"]:
            return f"{file}: {file.stat().st_size} bytes, {MANIFEST} says {entry['size']} (truncated?)"
    for file in sorted(path.glob("*.safetensors")):
        problem = _safetensors_problem(file)
        if problem:
            return problem
    return content_problem(path) if contents else None


def content_problem(path: Path) -> Optional[str]:
    """The first file of the checkpoint folder ``path`` whose content hash is not the one its
    manifest recorded, named (None: all match, or nothing to compare); files of the right size
    assumed (``checkpoint_problem``)."""
    files, kind, problem = _manifest_files(Path(path), notice=False)
    if problem or kind is None:
        return problem
    for name, entry in files.items():
        if file_hash(Path(path) / name, kind) != entry.get(kind):
            return (f"{Path(path) / name}: its content differs from the {kind} hash that {MANIFEST} recorded "
                    "(changed on disk since it was saved)")
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
        problem, state = checkpoint_problem(path, contents=False), None
        if problem is None:  # the contents are hashed while the trainer state loads
            with ThreadPoolExecutor(1, thread_name_prefix="lens-checkpoint-hash") as pool:
                changed = pool.submit(content_problem, path)
                try:
                    state = load_trainer_state(path)
                except CheckpointError as err:
                    problem = str(err)
                problem = changed.result() or problem
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
