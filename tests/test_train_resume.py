"""Resuming a run whose checkpoints are damaged: the newest intact checkpoint is used and named
in the log, damaged ones are kept aside (never trained over or deleted), and with none intact
the trainer stops with an error naming the files, leaving the run directory as it was.  Damage
that keeps a file's size (flipped bytes) is caught by the manifest's content hashes."""
from __future__ import annotations

import hashlib
import json
import logging
import struct
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from lens_kernels.train import checkpoint as ck  # noqa: E402
from lens_kernels.train.toy import build_toy_model, build_toy_tokenizer  # noqa: E402


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Checkpoints step_000001 and step_000002 of a toy model, ``latest`` naming step 2."""
    tok = build_toy_tokenizer()
    model = build_toy_model(tok, 16, 1, 2, seed=0)
    optimizer = torch.optim.AdamW(model.parameters())
    folder = tmp_path_factory.mktemp("ckpts")
    for step in (1, 2):
        ck.save_checkpoint(folder, step, model, tok, optimizer, {"sampler": {"index": step}},
                           keep=2, config_yaml="seed: 0\n")
    return folder


@pytest.fixture
def ckpts(saved, tmp_path) -> Path:
    folder = tmp_path / "checkpoints"
    shutil.copytree(saved, folder)
    return folder


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    """Invert 8 bytes in place, same size: inside the first tensor of a ``.safetensors`` file
    (after its header, so the header check passes), in the middle of any other file."""
    data = bytearray(path.read_bytes())
    at = 8 + struct.unpack("<Q", data[:8])[0] + 16 if path.suffix == ".safetensors" else len(data) // 2
    data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
    path.write_bytes(data)


DAMAGE = {
    "state-missing": lambda c: (c / "step_000002" / ck.STATE_FILE).unlink(),
    "state-truncated": lambda c: _truncate(c / "step_000002" / ck.STATE_FILE),
    "state-bytes-flipped": lambda c: _flip(c / "step_000002" / ck.STATE_FILE),
    "weights-truncated": lambda c: _truncate(c / "step_000002" / "model.safetensors"),
    "weights-bytes-flipped": lambda c: _flip(c / "step_000002" / "model.safetensors"),
    "tokenizer-truncated": lambda c: _truncate(c / "step_000002" / "tokenizer.json"),
    "folder-missing": lambda c: shutil.rmtree(c / "step_000002"),
}


def test_intact_checkpoints_resume_from_latest_quietly(ckpts, caplog):
    with caplog.at_level(logging.WARNING, logger="lens_kernels.train"):
        point = ck.resume_point(ckpts)
    assert point.path == ckpts / "step_000002" and point.state["step"] == 2
    assert point.state["sampler"] == {"index": 2} and caplog.text == ""


def _digest(kind: str, data: bytes) -> str:
    if kind == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128(data).hexdigest()
    return hashlib.new(kind, data).hexdigest()


def test_manifest_records_every_file_with_size_and_content_hash(ckpts):
    folder = ckpts / "step_000002"
    manifest = json.loads((folder / ck.MANIFEST).read_text())
    assert manifest["format"] == 2 and manifest["hash"] == ck.HASH
    files = sorted(p.name for p in folder.iterdir() if p.name != ck.MANIFEST)
    assert sorted(manifest["files"]) == files and ck.STATE_FILE in files
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), ck.HASH: _digest(ck.HASH, data)}, name


@pytest.mark.parametrize("kind", ["xxh3_128", "sha256"])  # sha256: where xxhash is not installed
def test_flipped_bytes_are_named_as_a_content_change(tmp_path, monkeypatch, kind):
    if kind == "xxh3_128":
        pytest.importorskip("xxhash")
    monkeypatch.setattr(ck, "HASH", kind)
    tok = build_toy_tokenizer()
    model = build_toy_model(tok, 16, 1, 2, seed=0)
    folder = ck.save_checkpoint(tmp_path, 1, model, tok, torch.optim.SGD(model.parameters(), lr=1.0), {},
                                keep=1, config_yaml="")
    assert json.loads((folder / ck.MANIFEST).read_text())["hash"] == kind
    assert ck.checkpoint_problem(folder) is None
    _flip(folder / "model.safetensors")
    problem = ck.checkpoint_problem(folder)
    assert problem == (f"{folder / 'model.safetensors'}: its content differs from the {kind} hash that "
                       "manifest.json recorded (changed on disk since it was saved)")


def test_hashes_this_python_cannot_compute_are_skipped_with_a_notice(ckpts, caplog):
    folder = ckpts / "step_000002"
    manifest = json.loads((folder / ck.MANIFEST).read_text())
    (folder / ck.MANIFEST).write_text(json.dumps(dict(manifest, hash="xxh9")))
    _flip(folder / "model.safetensors")  # not detectable without the hash
    with caplog.at_level(logging.INFO, logger="lens_kernels.train"):
        assert ck.checkpoint_problem(folder) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"{folder / ck.MANIFEST}: content hashes of kind 'xxh9', which this Python cannot compute (for "
        "xxh3_128: pip install xxhash); checked by file size only"]


def test_manifest_without_hashes_is_checked_by_size_with_a_notice(ckpts, caplog):
    folder = ckpts / "step_000002"
    files = json.loads((folder / ck.MANIFEST).read_text())["files"]
    (folder / ck.MANIFEST).write_text(json.dumps({name: e["size"] for name, e in files.items()}))
    with caplog.at_level(logging.INFO, logger="lens_kernels.train"):
        assert ck.resume_point(ckpts).path == folder
    notices = [r.getMessage() for r in caplog.records]
    assert notices == [f"{folder / ck.MANIFEST}: no content hashes (written before lens-kernels recorded "
                       "them); checked by file size only"]
    _truncate(folder / "tokenizer.json")  # sizes are still checked
    assert "(truncated?)" in ck.checkpoint_problem(folder)


def test_fresh_directory_has_no_resume_point(tmp_path):
    assert ck.resume_point(tmp_path / "checkpoints") is None


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_falls_back_to_the_newest_intact_one(ckpts, caplog, damage):
    DAMAGE[damage](ckpts)
    before = _snapshot(ckpts / "step_000002") if (ckpts / "step_000002").exists() else None
    with caplog.at_level(logging.WARNING, logger="lens_kernels.train"):
        point = ck.resume_point(ckpts)
    assert point.path == ckpts / "step_000001" and point.state["step"] == 1
    assert f"resuming from {ckpts / 'step_000001'}, the newest intact checkpoint" in caplog.text
    assert "step_000002" in caplog.text.split("resuming from")[0]  # what was wrong, first
    assert not (ckpts / "step_000002").exists()
    if before is not None:  # kept aside byte for byte, out of reach of pruning and resuming
        assert _snapshot(ckpts / "damaged-step_000002") == before
        assert ck.step_dirs(ckpts) == [ckpts / "step_000001"]


def test_latest_naming_a_missing_step_is_reported(ckpts, caplog):
    (ckpts / "latest").write_text("step_000009\n")
    with caplog.at_level(logging.WARNING, logger="lens_kernels.train"):
        assert ck.resume_point(ckpts).path == ckpts / "step_000002"
    assert "names 'step_000009', which is missing" in caplog.text


def test_checkpoint_without_manifest_is_checked_by_its_safetensors_header(ckpts):
    (ckpts / "step_000002" / ck.MANIFEST).unlink()  # as written before manifests
    assert ck.checkpoint_problem(ckpts / "step_000002") is None
    weights = ckpts / "step_000002" / "model.safetensors"
    with open(weights, "ab") as f:
        f.truncate(weights.stat().st_size - 1)
    assert "(truncated?)" in ck.checkpoint_problem(ckpts / "step_000002")


def test_no_intact_checkpoint_stops_and_changes_nothing(ckpts):
    _flip(ckpts / "step_000001" / ck.STATE_FILE)
    _truncate(ckpts / "step_000002" / "model.safetensors")
    before = _snapshot(ckpts)
    with pytest.raises(ck.CheckpointError) as err:
        ck.resume_point(ckpts)
    message = str(err.value)
    assert str(ckpts / "step_000001" / ck.STATE_FILE) in message
    assert str(ckpts / "step_000002" / "model.safetensors") in message
    assert "another --run-dir" in message and "left as it is" in message
    assert _snapshot(ckpts) == before


def test_a_failed_save_leaves_the_previous_checkpoints(ckpts, monkeypatch):
    tok = build_toy_tokenizer()
    model = build_toy_model(tok, 16, 1, 2, seed=1)
    before = _snapshot(ckpts)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", disk_full)
    with pytest.raises(OSError):
        ck.save_checkpoint(ckpts, 3, model, tok, torch.optim.SGD(model.parameters(), lr=1.0),
                           {"sampler": {}}, keep=1, config_yaml="")
    assert {k: v for k, v in _snapshot(ckpts).items() if not k.startswith(".")} == before
    assert ck.resume_point(ckpts).path == ckpts / "step_000002"


def test_checkpoints_are_written_and_read_without_transformers_progress_bars(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    from lens_kernels.train.config import TrainConfig
    from lens_kernels.train.trainer import load_policy

    tok = build_toy_tokenizer()
    model = build_toy_model(tok, 16, 1, 2, seed=0)
    ck.save_checkpoint(tmp_path, 1, model, tok, torch.optim.SGD(model.parameters(), lr=1.0),
                       {"sampler": {}}, keep=1, config_yaml="")
    ck.save_model(tmp_path / "start", model, tok)
    loaded = load_policy(tmp_path / "step_000001", TrainConfig(device="cpu", bf16=False))
    assert torch.equal(loaded.model.lm_head.weight, model.lm_head.weight.to(loaded.device))
    assert hf_logging.is_progress_bar_enabled()  # restored after each save and load
    err = capfd.readouterr().err
    assert "Writing model shards" not in err and "Loading weights" not in err, err


RUN = ["--steps", "2", "--save-every", "1", "--keep-checkpoints", "2", "--modes", "lens",
       "--verifier", "exact", "--eval-data", "", "--group-size", "4", "--prompts-per-step", "2",
       "--minibatch-prompts", "0",
       "--max-new-tokens", "4", "--warm-start-steps", "2", "--toy-train-size", "20",
       "--toy-hidden-size", "16", "--toy-layers", "1", "--toy-heads", "2", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-step lens-train run directory with checkpoints after steps 1 and 2."""
    from lens_kernels.train.cli import train_main

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert train_main(RUN + ["--run-dir", str(run_dir)]) == 0
    return run_dir


@pytest.mark.parametrize("damage", ["state-missing", "weights-bytes-flipped"])
def test_lens_train_resumes_from_the_older_checkpoint_when_latest_is_damaged(
        trained, tmp_path, caplog, damage):
    """Issue 20's repro among them: bytes flipped inside the latest model.safetensors, same size
    (it used to resume from it with weights of 1e37 and zero gradients)."""
    from lens_kernels.train.cli import train_main

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    ckpts = run_dir / "lens" / "checkpoints"
    DAMAGE[damage](ckpts)
    damaged = _snapshot(ckpts / "step_000002")
    metrics = (run_dir / "lens" / "metrics.jsonl").read_text().splitlines()
    step1 = _snapshot(ckpts / "step_000001")
    with caplog.at_level(logging.INFO, logger="lens_kernels.train"):
        assert train_main(RUN + ["--run-dir", str(run_dir)]) == 0
    assert f"resuming from {ckpts / 'step_000001'}" in caplog.text
    assert str(ckpts / "step_000002") in caplog.text.split("resuming from")[0]
    after = (run_dir / "lens" / "metrics.jsonl").read_text().splitlines()
    assert after[0] == metrics[0] and [json.loads(line)["step"] for line in after] == [1, 2]
    assert _snapshot(ckpts / "step_000001") == step1  # the intact one is kept, untouched
    assert ck.resume_point(ckpts).state["step"] == 2
    assert _snapshot(ckpts / "damaged-step_000002") == damaged  # kept byte for byte


def test_lens_train_stops_on_a_run_without_an_intact_checkpoint(trained, tmp_path, capsys):
    from lens_kernels.train.cli import train_main

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    ckpts = run_dir / "lens" / "checkpoints"
    shutil.rmtree(ckpts / "step_000001")
    _truncate(ckpts / "step_000002" / ck.STATE_FILE)
    before = _snapshot(run_dir / "lens")
    assert train_main(RUN + ["--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lens-train: error: ") and "Traceback" not in err
    assert str(ckpts / "step_000002" / ck.STATE_FILE) in err and "another --run-dir" in err
    assert _snapshot(run_dir / "lens") == before  # checkpoints and metrics
