"""lens-study end to end on tiny settings: a study killed mid-run resumes to exactly the
results of an uninterrupted one, worker processes (--jobs 2) give the same results as one
process, matched starts, the report's contents, and refused options."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

pytest.importorskip("transformers")

from lens_kernels.train import trainer  # noqa: E402
from lens_kernels.train.metrics import read_metrics  # noqa: E402
from lens_kernels.train.study import parse_seeds, study_main  # noqa: E402

TINY = {
    "steps": 4, "group_size": 4, "prompts_per_step": 4, "minibatch_prompts": 2,
    "max_new_tokens": 6, "warm_start_steps": 20, "warm_start_batch": 16, "toy_train_size": 40,
    "toy_eval_size": 6, "eval_samples": 4, "eval_ks": [1, 2, 4], "eval_every": 2,
    "save_every": 2, "lr": 1e-3, "toy_hidden_size": 32, "toy_layers": 1, "toy_heads": 2,
    "verifier": "exact",
}


def _study(tmp_path, name: str, *extra: str) -> int:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    return study_main(["--config", str(config), "--seeds", "1", "--modes", "lens,grpo",
                       "--study-dir", str(tmp_path / name), "--heartbeat", "600", *extra])


def _results(tmp_path, name: str) -> dict:
    return json.loads((tmp_path / name / "default" / "study-default.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted tiny study in this process: (folder, its JSON)."""
    tmp_path = tmp_path_factory.mktemp("study")
    assert _study(tmp_path, "straight") == 0
    return tmp_path, _results(tmp_path, "straight")


class _Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


def test_killed_study_resumes_to_identical_results(reference, tmp_path, monkeypatch, capsys):
    real_step = trainer.train_step

    def dies_in_grpo_at_step_4(step, config, mode, *args):
        if mode == "grpo" and step == 4:
            raise _Killed
        return real_step(step, config, mode, *args)

    monkeypatch.setattr(trainer, "train_step", dies_in_grpo_at_step_4)
    with pytest.raises(_Killed):
        _study(tmp_path, "killed")
    monkeypatch.setattr(trainer, "train_step", real_step)
    seed_dir = tmp_path / "killed" / "default" / "seed_0"
    assert [r["step"] for r in read_metrics(seed_dir / "grpo" / "metrics.jsonl")] == [0, 1, 2, 3]
    capsys.readouterr()
    assert _study(tmp_path, "killed") == 0
    assert "2 of 3 units already done, 1 to run" in capsys.readouterr().out
    assert "resuming from" in (seed_dir / "grpo.log").read_text()
    assert _results(tmp_path, "killed") == reference[1]


def test_worker_processes_give_the_same_results(reference, tmp_path):
    # The warm start is copied from the reference (one fewer process to start): the two modes
    # then train side by side in worker processes.
    shutil.copytree(reference[0] / "straight" / "default" / "seed_0" / "start",
                    tmp_path / "parallel" / "default" / "seed_0" / "start")
    assert _study(tmp_path, "parallel", "--jobs", "2") == 0
    assert _results(tmp_path, "parallel") == reference[1]


def test_modes_start_from_the_same_point_and_the_report_has_the_tables(reference):
    folder, results = reference
    runs = results["runs"]
    assert results["finished"] == {"lens": [0], "grpo": [0]}
    lens, grpo = runs["lens"]["0"]["curves"], runs["grpo"]["0"]["curves"]
    assert lens["eval"]["pass@1"][0] == grpo["eval"]["pass@1"][0]  # one warm start, one seed
    assert grpo["train"]["grad_share_negative_groups"] == [0.0] * len(grpo["train"]["step"])
    assert results["summary"]["paired"]["lens"] == {"seeds": [0]}  # one seed: no interval
    report = (folder / "straight" / "default" / "study-default.md").read_text()
    assert "## Per mode: mean [95% t-interval] over seeds" in report
    assert "| negative-group grad share |" in report
    assert "Fewer than two seeds finished both modes" in report
    assert (folder / "straight" / "default" / "study-default.png").stat().st_size > 10_000


def test_resuming_with_other_options_is_refused(reference, capsys):
    folder, _ = reference
    with pytest.raises(SystemExit):
        _study(folder, "straight", "--lr", "0.01")
    assert "different options ['lr']" in capsys.readouterr().err


@pytest.mark.parametrize("text, seeds", [("3", [0, 1, 2]), ("4-6", [4, 5, 6]), ("0,2,7", [0, 2, 7])],
                         ids=["count", "range", "list"])
def test_seed_specs(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "two"], "--seeds"),
    (["--seeds", "1,1"], "--seeds"),
    (["--jobs", "0"], "--jobs"),
    (["--modes", "lens,ppo"], "modes"),
], ids=["seeds-word", "seeds-repeated", "jobs-zero", "unknown-mode"])
def test_bad_arguments_are_named(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        study_main(argv + ["--study-dir", str(tmp_path)])
    assert message in capsys.readouterr().err
