"""TrainConfig: YAML and command-line round trips, precedence, and rejected values."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

yaml = pytest.importorskip("yaml")

from lens_kernels.train.config import (  # noqa: E402
    TOY_DEFAULTS, TrainConfig, add_config_flags, flag_overrides, resolve_config,
)

CUSTOM = TrainConfig(
    model="/models/qwen", run_dir="out", seed=3, bf16=False, plugins=["my.verifiers"],
    prompt_template="Q: {problem}\nA (in \\boxed{{}}):", modes=["grpo", "lens-negative-only"],
    alpha=0.5, clip_ratio_c=3.0, length_gamma=0.9, lr=3e-7, eval_ks=[1, 4], eval_samples=4,
    minibatch_prompts=8, rollout="vllm", max_new_tokens=2048,
)


def _parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_config_flags(parser)
    args = parser.parse_args(argv)
    return resolve_config(args.config, flag_overrides(args))


def test_paper_defaults():
    c = TrainConfig()
    assert (c.group_size, c.prompts_per_step, c.temperature, c.top_p) == (16, 32, 1.0, 1.0)
    assert (c.clip_low, c.clip_high, c.alpha, c.kl_beta, c.lr) == (0.2, 0.2, 0.25, 0.0, 1e-6)
    assert c.modes == ["lens"]


@pytest.mark.parametrize("config", [TrainConfig(), CUSTOM], ids=["defaults", "custom"])
def test_yaml_round_trip(config):
    assert TrainConfig.from_dict(yaml.safe_load(config.to_yaml())) == config


def test_every_field_is_a_flag_and_flags_round_trip():
    argv = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(CUSTOM, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, ",".join(map(str, value))]
        elif value is not None:
            argv += [flag, str(value)]
    assert _parse(argv) == CUSTOM


def test_help_shows_lists_as_they_are_typed():
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    helps = {a.dest: a.help for a in parser._actions}
    assert "embedded default 'lens,grpo'" in helps["modes"]
    assert ": lens, grpo, lens-mixed-only, lens-negative-only (default 'lens'" in helps["modes"]
    assert not [name for name, text in helps.items() if text and "[" in text]


def test_precedence_defaults_toy_yaml_flags(tmp_path):
    no_args = _parse([])
    for name, value in TOY_DEFAULTS.items():
        assert getattr(no_args, name) == value  # no model: the embedded default
    path = tmp_path / "c.yaml"
    path.write_text("model: /m\nlr: 2.0e-6\ngroup_size: 8\n")
    c = _parse(["--config", str(path), "--group-size", "4", "--clip-ratio-c", "none"])
    assert (c.model, c.lr, c.group_size, c.clip_ratio_c) == ("/m", 2e-6, 4, None)
    assert c.steps == TrainConfig().steps  # a named model gets the paper's values, not the toy's


@pytest.mark.parametrize(
    "values,match",
    [
        ({"learning_rate": 1.0}, "unknown option"),
        ({"group_size": 1}, "group_size"),
        ({"group_size": "x"}, "group_size: expected an integer"),
        ({"lr": "fast"}, "lr: expected a number"),
        ({"steps": 2.5}, "steps: expected an integer"),
        ({"bf16": "maybe"}, "bf16: expected true or false"),
        ({"modes": ["lens", "ppo"]}, "unknown mode 'ppo'"),
        ({"modes": ["lens", "lens"]}, "distinct"),
        ({"rollout": "sglang"}, "rollout"),
        ({"minibatch_prompts": 5}, "divisor of prompts_per_step"),
        ({"eval_ks": [1, 32]}, "largest k"),
        ({"prompt_template": 3}, "expected a string"),
    ],
    ids=lambda v: v if isinstance(v, str) else next(iter(v)),
)
def test_bad_values_are_rejected(values, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(values)


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        resolve_config(str(path), {})
