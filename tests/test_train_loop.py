"""The training loop end to end on a tiny model: a 2-step smoke run through the CLI, exact
gradient accumulation, and resume-equals-uninterrupted after a kill mid-run."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("math_verify")

from lens_kernels.train import trainer  # noqa: E402
from lens_kernels.train.cli import eval_main, train_main  # noqa: E402
from lens_kernels.train.config import resolve_config  # noqa: E402
from lens_kernels.train.metrics import read_metrics  # noqa: E402
from lens_kernels.train.policy import Policy  # noqa: E402
from lens_kernels.train.ppo import ppo_update  # noqa: E402
from lens_kernels.train.rollout import hf_generate  # noqa: E402
from lens_kernels.train.toy import build_toy_model, build_toy_tokenizer  # noqa: E402

TINY = {
    "steps": 2, "group_size": 4, "prompts_per_step": 4, "minibatch_prompts": 2,
    "max_new_tokens": 6, "warm_start_steps": 20, "warm_start_batch": 16, "toy_train_size": 40,
    "toy_eval_size": 6, "eval_samples": 4, "eval_ks": [1, 2, 4], "eval_every": 2,
    "save_every": 1, "lr": 1e-3, "toy_hidden_size": 32, "toy_layers": 1, "toy_heads": 2,
    "progress": False,
}


def _flags(values: dict) -> list[str]:
    out = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_two_step_smoke_run_through_the_cli(tmp_path, capsys, caplog):
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="lens_kernels.train"):
        assert train_main(_flags({**TINY, "run_dir": str(run_dir), "modes": ["lens", "grpo"]})
                          + ["--results-json", str(tmp_path / "results.json")]) == 0
    assert caplog.text.count("loss path: fused-linear") == 1, caplog.text  # once per run, not per mode
    caplog.clear()
    printed = capsys.readouterr().out
    assert "| step | lens train acc |" in printed and "grpo pass@4" in printed
    assert (run_dir / "curves.png").stat().st_size > 10_000
    start = _weights(run_dir / "start")
    for mode in ("lens", "grpo"):
        records = read_metrics(run_dir / mode / "metrics.jsonl")
        assert [r["step"] for r in records] == [0, 1, 2]
        for r in records:
            assert all(math.isfinite(v) for v in r.values() if isinstance(v, (int, float)))
        for key in ("accuracy", "negative_group_fraction", "clip_fraction", "confidence_mean",
                    "loss", "grad_norm", "time_rollout", "time_update", "eval/hard/pass@1"):
            assert key in records[-1], key
        assert 0 <= records[-1]["negative_group_fraction"] <= 1
        assert records[1]["sampler_logprob_gap"] < 1e-4  # sampler and trainer agree on CPU
        final = _weights(run_dir / mode / "checkpoints" / "step_000002")
        assert final.keys() == start.keys()
        changed = any(not torch.equal(final[k], start[k]) for k in start)
        only_negative = all(r["negative_group_fraction"] == 1.0 for r in records[1:])
        # LENS learns from every group; GRPO gets no gradient from all-negative batches
        assert changed == (mode == "lens" or not only_negative), (mode, only_negative)
    lens = read_metrics(run_dir / "lens" / "metrics.jsonl")
    grpo = read_metrics(run_dir / "grpo" / "metrics.jsonl")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["records"] == {"lens": lens, "grpo": grpo} and results["command"].startswith("lens-train --steps 2")
    assert results["wall_s"] > 0 and results["versions"]["torch"] == torch.__version__
    assert lens[1]["accuracy"] == grpo[1]["accuracy"]  # same start, same seed, same first rollout
    if lens[1]["negative_group_fraction"] > 0:
        assert grpo[1]["advantage_abs_negative_groups"] == 0.0
        assert lens[1]["advantage_abs_negative_groups"] > 0.0

    out = tmp_path / "eval.json"
    ckpt = run_dir / "lens" / "checkpoints" / "step_000002"
    with caplog.at_level(logging.INFO, logger="lens_kernels.train"):
        assert eval_main(["--model", str(ckpt), "--toy-eval-size", "5", "--out", str(out)]) == 0
    assert "loss path" not in caplog.text  # lens-eval computes no loss
    result = json.loads(out.read_text())
    assert result["eval/problems"] == 5 and 0 <= result["eval/pass@1"] <= result["eval/pass@4"] <= 1
    table = capsys.readouterr().out
    all_row = next(line for line in table.splitlines() if line.startswith("| all |"))
    assert all_row.split("|")[3].strip() == f"{result['eval/pass@1']:.3f}"  # fractions, as lens-train prints
    assert "| levels 4-5 |" in table


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_accumulate_the_whole_minibatch_gradient(agg):
    tok = build_toy_tokenizer()
    prompts = [tok(p).input_ids for p in ["3+4=", "12-5=", "7*3="]]
    torch.manual_seed(0)
    rollout = hf_generate(build_toy_model(tok, 32, 1, 2, seed=0), tok, prompts, 4, 1.0, 1.0, 5)
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 0])  # mixed, negative, mixed
    deltas = []
    for micro in (0, 4):
        config = resolve_config(None, {"group_size": 4, "prompts_per_step": 3, "minibatch_prompts": 0,
                                       "loss_agg_mode": agg,
                                       "micro_batch_rows": micro, "max_grad_norm": 1e9})
        policy = Policy.wrap(build_toy_model(tok, 32, 1, 2, seed=0), tok, "cpu")
        before = [p.detach().clone() for p in policy.model.parameters()]
        old = policy.logprobs(rollout, 1.0)
        sgd = torch.optim.SGD(policy.model.parameters(), lr=1.0)
        stats = ppo_update(policy, sgd, rollout, rewards, old, None, config, "lens")
        assert stats["updates"] == 1
        deltas.append([p.detach() - b for p, b in zip(policy.model.parameters(), before)])
    assert any(d.abs().max() > 0 for d in deltas[0])
    for whole, accumulated in zip(*deltas):
        torch.testing.assert_close(accumulated, whole, rtol=1e-5, atol=1e-7)


class _Killed(Exception):
    pass


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    options = {**TINY, "steps": 4, "save_every": 2, "modes": ["lens"], "verifier": "exact"}
    straight = trainer.run(resolve_config(None, {**options, "run_dir": str(tmp_path / "a")}))["lens"]

    run_dir = tmp_path / "b"
    config = resolve_config(None, {**options, "run_dir": str(run_dir)})
    real_step = trainer.train_step

    def dies_at_step_4(step, *args):
        if step == 4:
            raise _Killed
        return real_step(step, *args)

    monkeypatch.setattr(trainer, "train_step", dies_at_step_4)
    with pytest.raises(_Killed):
        trainer.run(config)
    monkeypatch.setattr(trainer, "train_step", real_step)
    metrics_path = run_dir / "lens" / "metrics.jsonl"
    assert [r["step"] for r in read_metrics(metrics_path)] == [0, 1, 2, 3]
    ckpts = run_dir / "lens" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000002"
    with open(metrics_path, "a") as f:
        f.write('{"step": 4, "accura')  # a line torn by the kill
    resumed = trainer.run(config)["lens"]

    def strip(records):
        return [{k: v for k, v in r.items() if not k.startswith("time")} for r in records]

    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    assert strip(resumed) == strip(straight)
    assert strip(read_metrics(metrics_path)) == strip(straight)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000002", "step_000004"]
    a = _weights(tmp_path / "a" / "lens" / "checkpoints" / "step_000004")
    b = _weights(ckpts / "step_000004")
    assert all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ValueError, match=r"different options \['lr'\]"):
        trainer.run(resolve_config(None, {**options, "run_dir": str(run_dir), "lr": 1e-2}))
