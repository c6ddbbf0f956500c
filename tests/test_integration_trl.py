"""lens_kernels.integrations.trl through TRL's own GRPOTrainer (CPU, tiny model, 2 steps).

A 1-layer ``LlamaForCausalLM`` built from a config and a character tokenizer built on the spot
(no hub). Two prompts, one group of 4 completions per step and no shuffling: step 1's prompt
always gets reward 0 (an all-wrong group), step 2's gets one correct completion (a mixed
group). Skipped when TRL is not installed (``pip install -e ".[trl]"``).
"""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

import lens_kernels as lk

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[trl]')")
    datasets = pytest.importorskip("datasets", reason="datasets (a TRL dependency) is not installed")
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lens_kernels.integrations.trl import LensGRPOConfig, LensGRPOTrainer

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")

GROUP = 4
PROMPTS = ["never: abc", "maybe: abc"]  # step 1: all-wrong group; step 2: mixed group


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer made from the ``tokenizers`` library, on the spot."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz :"))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", padding_side="left")


def tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    return LlamaForCausalLM(config)


class RecordingReward:
    """Reward 0 for "never" prompts; for "maybe" prompts, 1 for the first completion of each group."""

    __name__ = "recording_reward"

    def __init__(self) -> None:
        self.calls: list[list[float]] = []

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        rewards = [1.0 if p.startswith("maybe") and i % GROUP == 0 else 0.0 for i, p in enumerate(prompts)]
        self.calls.append(rewards)
        return rewards


def independent_logps(model, out: dict, temperature: float) -> torch.Tensor:
    """Completion token log-probs by a plain forward pass (not TRL's code)."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits.float()
    width = out["completion_ids"].size(1)
    return lk.token_logprobs(logits[:, -width - 1:-1], out["completion_ids"], temperature=temperature)


class RecordingLensTrainer(LensGRPOTrainer):
    """Keeps each step's generation output and an independent log-prob pass over it."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.records.append({"out": out, "logps": independent_logps(self.model, out, self.args.temperature)})
        return out


def make_trainer(trainer_cls, tmp_path, reward, model=None, **config):
    """A trainer on the tiny model (or ``model``, e.g. a saved model's path), not yet trained."""
    tokenizer = char_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's own defaults trip transformers' deprecations
        settings = dict(
            output_dir=str(tmp_path), per_device_train_batch_size=GROUP, num_generations=GROUP,
            max_completion_length=6, max_steps=2, learning_rate=1e-2, logging_steps=1, report_to="none",
            use_cpu=True, seed=0, shuffle_dataset=False, save_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0,
        )
        args = LensGRPOConfig(**{**settings, **config})
        trainer = trainer_cls(model=tiny_llama(tokenizer) if model is None else model, reward_funcs=reward,
                              args=args, train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
                              processing_class=tokenizer)
    trainer.records, trainer.loss_records = [], []
    return trainer


def train(trainer_cls, tmp_path, reward, **config):
    trl_logger = logging.getLogger("trl")
    previous = trl_logger.level
    trl_logger.setLevel(logging.ERROR)
    try:
        trainer = make_trainer(trainer_cls, tmp_path, reward, **config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
    finally:
        trl_logger.setLevel(previous)
    return trainer


def step_logs(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two steps of the stock GRPOTrainer and two of LensGRPOTrainer, same model, data and seed."""
    stock_reward, lens_reward = RecordingReward(), RecordingReward()
    stock = train(trl.GRPOTrainer, tmp_path_factory.mktemp("stock"), stock_reward)
    lens = train(RecordingLensTrainer, tmp_path_factory.mktemp("lens"), lens_reward)
    reuse_reward = RecordingReward()  # num_iterations=2: TRL computes old_per_token_logps itself
    reuse = train(RecordingLensTrainer, tmp_path_factory.mktemp("reuse"), reuse_reward, num_iterations=2)
    return {"stock": stock, "lens": lens, "lens_reward": lens_reward, "reuse": reuse, "reuse_reward": reuse_reward}


def test_both_trainers_ran_two_steps_on_an_all_wrong_then_a_mixed_group(runs):
    assert runs["stock"].state.global_step == 2 and runs["lens"].state.global_step == 2
    assert runs["lens_reward"].calls == [[0.0] * GROUP, [1.0] + [0.0] * (GROUP - 1)]


def test_all_wrong_group_grad_norm_zero_for_grpo_positive_for_lens(runs):
    stock, lens = step_logs(runs["stock"], "grad_norm"), step_logs(runs["lens"], "grad_norm")
    assert len(stock) == len(lens) == 2
    assert stock[0] == 0.0, "stock GRPO should get no gradient from an all-wrong group"
    assert lens[0] > 1e-6, "LENS should learn from the all-wrong group"
    assert stock[1] > 1e-6 and lens[1] > 1e-6  # the mixed group trains both


def test_lens_advantages_equal_lens_advantages_on_same_rewards_and_logprobs(runs):
    trainer, rewards = runs["lens"], runs["lens_reward"].calls
    assert len(trainer.records) == 2
    for step, record in enumerate(trainer.records):
        out = record["out"]
        expected = lk.lens_advantages(record["logps"], out["completion_mask"], torch.tensor(rewards[step]),
                                      group_size=GROUP, std_eps=1e-6)
        torch.testing.assert_close(out["advantages"], expected.advantages, rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"step {step + 1}: {m}")
    assert trainer.records[0]["out"]["advantages"].abs().max() > 1e-4  # all-wrong group: non-zero


def test_uses_trl_old_logprobs_when_trl_computed_them(runs):
    trainer, rewards = runs["reuse"], runs["reuse_reward"].calls
    assert len(trainer.records) == 1, "num_iterations=2 over 2 steps: one generation"
    record = trainer.records[0]
    out = record["out"]
    assert "old_per_token_logps" in out
    mask = out["completion_mask"].bool()
    torch.testing.assert_close(out["old_per_token_logps"][mask], record["logps"][mask], rtol=1e-5, atol=1e-6)
    expected = lk.lens_advantages(out["old_per_token_logps"], out["completion_mask"], torch.tensor(rewards[0]),
                                  group_size=GROUP)
    torch.testing.assert_close(out["advantages"], expected.advantages, rtol=1e-6, atol=1e-7)
    assert step_logs(trainer, "grad_norm")[0] > 1e-6


def test_lens_metrics_are_logged_through_trl(runs):
    assert step_logs(runs["lens"], "lens/negative_group_fraction") == [1.0, 0.0]
    confidence = step_logs(runs["lens"], "lens/confidence_mean")
    assert len(confidence) == 2 and all(0 < c < 1 for c in confidence)
    assert len(step_logs(runs["lens"], "lens/negative_group_abs_advantage_mean")) == 1


@pytest.mark.parametrize("field, value, message", [
    ("lens_mode", "lens-ish", r"lens_mode: expected one of"),
    ("lens_alpha", -0.1, r"lens_alpha: expected a number >= 0"),
    ("lens_length_gamma", 1.5, r"lens_length_gamma: expected None or a number in \(0, 1\)"),
    ("scale_rewards", "batch", r"scale_rewards='batch': LENS normalises within each group"),
], ids=["bad-mode", "negative-alpha", "gamma-out-of-range", "batch-scaling"])
def test_config_rejects_bad_lens_options(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        LensGRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **{field: value})


def test_config_defaults_to_paper_aggregation(tmp_path):
    args = LensGRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert (args.loss_type, args.lens_mode, args.lens_alpha) == ("grpo", "lens", 0.25)
