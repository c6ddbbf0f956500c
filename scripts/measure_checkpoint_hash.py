"""What the checkpoint content hashes cost (docs/trainer.md, "Evaluation, checkpoints, resume").

Saves a Qwen2.5-0.5B-shaped policy (494M parameters, fp32: a 1.98 GB model.safetensors) with
its AdamW state (3.95 GB in trainer_state.pt) through ``save_checkpoint``, alternating saves
with the content hashes on and off (off: a hash that reads nothing).  Wall times of whole saves
vary with the disk by more than the hash costs, so each hashed save also records the time its
own thread spent hashing (the optimizer state, as it is written) and waiting for the background
hashes: the save's serial hash cost.  Then it times hashing the checkpoint alone
(``checkpoint.HASH``, and SHA-256 for comparison) and what a resume adds:
``resume_point`` (the checks, the hashes in a thread beside ``torch.load`` of the trainer
state) with and without the hashes, and ``checkpoint_problem`` alone (sizes, headers, hashes).
Everything is written under ``--dir`` (default: a temporary folder) and deleted at the end;
the figures go to stdout and, with ``--out``, to a JSON with the machine, versions and commit.

    python scripts/measure_checkpoint_hash.py --rounds 3 --out benchmarks/results/checkpoint-hash-cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def build_state():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lens_kernels.train.toy import build_toy_tokenizer

    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    optimizer.step()  # creates exp_avg and exp_avg_sq: the 2x-model optimizer state of a real run
    for p in model.parameters():
        p.grad = None
    return model, build_toy_tokenizer(), optimizer


class Timed:
    """The real hash, its ``update`` time added to ``spent[thread is main]``."""

    spent = {True: 0.0, False: 0.0}

    def __init__(self, digest) -> None:
        self._digest = digest

    def update(self, data) -> None:
        began = time.perf_counter()
        self._digest.update(data)
        Timed.spent[threading.current_thread() is threading.main_thread()] += time.perf_counter() - began

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def timed_wait(of):
    """``_Hashes.of``, its time added to ``Timed.spent[True]`` (the save waits for the hashes)."""
    def wrapper(self, folder):
        began = time.perf_counter()
        try:
            return of(self, folder)
        finally:
            Timed.spent[True] += time.perf_counter() - began
    return wrapper


class NoHash:
    """Takes the bytes and hashes nothing: a save "without hashing"."""

    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    from lens_kernels.train import checkpoint as ck

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="saves with hashes, and as many without")
    parser.add_argument("--dir", help="where to write (default: a temporary folder); deleted after")
    parser.add_argument("--out", help="also write the figures, machine and versions to this JSON")
    args = parser.parse_args()
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="lens-ckpt-hash-", dir=args.dir))
    real_hasher, real_of, real_content = ck._hasher, ck._Hashes.of, ck.content_problem
    try:
        began = time.perf_counter()
        model, tokenizer, optimizer = build_state()
        print(f"state built in {time.perf_counter() - began:.1f} s", flush=True)
        times = {"hashed": [], "unhashed": []}
        serial, background = [], []
        step = 0
        for _ in range(args.rounds):
            for kind in ("unhashed", "hashed"):
                ck._hasher = (lambda name: Timed(real_hasher(name))) if kind == "hashed" else (lambda name: NoHash())
                ck._Hashes.of = timed_wait(real_of) if kind == "hashed" else real_of
                Timed.spent = {True: 0.0, False: 0.0}
                step += 1
                began = time.perf_counter()
                final = ck.save_checkpoint(root, step, model, tokenizer, optimizer, {"sampler": {}}, keep=1,
                                           config_yaml="")
                times[kind].append(time.perf_counter() - began)
                if kind == "hashed":
                    serial.append(Timed.spent[True])
                    background.append(Timed.spent[False])
                print(f"save {step} ({kind}): {times[kind][-1]:.2f} s" + (
                    f", hashing {serial[-1]:.2f} s in the save's thread, {background[-1]:.2f} s in the "
                    "background" if kind == "hashed" else ""), flush=True)
        ck._hasher, ck._Hashes.of = real_hasher, real_of
        size = folder_bytes(final)
        hash_alone = {}
        for kind in dict.fromkeys((ck.HASH, "sha256")):
            hash_alone[kind] = []
            for _ in range(args.rounds):
                began = time.perf_counter()
                for path in sorted(final.rglob("*")):
                    if path.is_file():
                        ck.file_hash(path, kind)
                hash_alone[kind].append(time.perf_counter() - began)
        resume = {"hashed": [], "unhashed": []}  # resume_point: checks, hashes beside torch.load of the state
        for _ in range(args.rounds):
            for kind in ("unhashed", "hashed"):
                ck.content_problem = real_content if kind == "hashed" else (lambda path: None)
                began = time.perf_counter()
                point = ck.resume_point(root)
                resume[kind].append(time.perf_counter() - began)
                assert point.path == final
                del point
        ck.content_problem = real_content
        began = time.perf_counter()
        problem = ck.checkpoint_problem(final)
        verify = time.perf_counter() - began
        assert problem is None, problem
        hashed, unhashed = statistics.median(times["hashed"]), statistics.median(times["unhashed"])
        from lens_kernels.bench.report import cpu_model, git_commit

        result = {
            "what": "cost of the checkpoint content hashes: save_checkpoint of a Qwen2.5-0.5B-shaped fp32 policy "
                    "with its AdamW state, hashed and unhashed saves alternated; hashing alone; resume_point with and "
                    "without the hashes",
            "command": "python " + " ".join(sys.argv),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "git_commit": git_commit(),
            "machine": f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                       f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
            "load_average": {"before": [round(x, 2) for x in load_before],
                             "after": [round(x, 2) for x in os.getloadavg()]},
            "versions": {name: importlib.metadata.version(name)
                         for name in ("torch", "transformers", "safetensors", "xxhash")},
            "python": platform.python_version(),
            "checkpoint_bytes": size,
            "save_s": {"hashed": times["hashed"], "unhashed": times["unhashed"]},
            "save_median_s": {"hashed": hashed, "unhashed": unhashed},
            "hash_cost_of_save": (hashed - unhashed) / unhashed,
            "serial_hash_s": serial,
            "background_hash_s": background,
            "serial_hash_share_of_save": [s / t for s, t in zip(serial, times["hashed"])],
            "hash": ck.HASH,
            "hash_alone_s": hash_alone,
            "hash_alone_GBps": {kind: size / min(times) / 1e9 for kind, times in hash_alone.items()},
            "resume_s": resume,
            "resume_median_s": {kind: statistics.median(values) for kind, values in resume.items()},
            "checkpoint_problem_s": verify,
        }
        print(json.dumps(result, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    finally:
        ck._hasher, ck._Hashes.of, ck.content_problem = real_hasher, real_of, real_content
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
