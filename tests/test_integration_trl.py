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


def test_two_processes_gather_rewards_and_stats_across_ranks(tmp_path):
    """torchrun, 2 CPU processes: each group is split across the ranks, so LENS needs the gather;
    the fused loss runs through DDP and equals TRL's on each rank."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a free port on the loopback for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = os.path.join(os.path.dirname(__file__), "_trl_two_process.py")
    env = {**os.environ, "LENS_OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stderr[-3000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for step in range(2):
        parts = [rank["records"][step] for rank in ranks]
        width = max(p["mask"].size(1) for p in parts)

        def cat(key):
            return torch.cat([torch.nn.functional.pad(p[key], (0, width - p[key].size(1))) for p in parts])

        rewards = torch.tensor(ranks[0]["rewards"][step] + ranks[1]["rewards"][step])
        expected = lk.lens_advantages(cat("logps"), cat("mask"), rewards, group_size=GROUP).advantages
        got = torch.cat([p["advantages"] for p in parts])
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7, msg=lambda m: f"step {step + 1}: {m}")
    assert torch.cat([p["advantages"] for p in ranks[0]["records"][0:1] + ranks[1]["records"][0:1]]).abs().max() > 1e-4
    for rank in range(2):  # the fused loss through DDP, dapo's token count gathered across the processes
        assert len(ranks[rank]["losses"]) == 2
        for step, record in enumerate(ranks[rank]["losses"]):
            assert_fused_equals_stock(record["stock"], record["fused"], f"rank {rank}, step {step + 1}")


# --- lens_fused_loss: lk.fused_linear_lens_loss against TRL's own _compute_loss ---------------------------------

FP32 = dict(bf16=False)  # TRL's default bf16=True autocasts even on CPU; parity is judged in fp32
STOCK_RTOL = 1e-5  # relative to the largest magnitude of the compared tensor (both sides are fp32)
LOSS_ATOL = 1e-7


def loss_grads_metrics(trainer, compute, model, inputs):
    """``(loss, {parameter: gradient}, {metric: values})`` of one loss call (the loss keeps its
    graph); the metrics it logged are taken out of the trainer's (two calls on one batch would
    log twice)."""
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]
    before = {key: len(values) for key, values in metrics.items()}
    loss = compute(model, inputs)
    logged = {}
    for key, values in metrics.items():
        start = before.get(key, 0)
        if len(values) > start:
            logged[key] = values[start:]
            del values[start:]
    named = [(name, p) for name, p in trainer.accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    return loss, dict(zip((name for name, _ in named), grads)), logged


def stock_and_fused(trainer, model, inputs):
    """TRL's ``_compute_loss`` (on the unwrapped model, so DDP sees one backward) and the fused one."""
    stock = loss_grads_metrics(trainer, lambda m, i: trl.GRPOTrainer._compute_loss(trainer, m, i),
                               trainer.accelerator.unwrap_model(model), inputs)
    fused = loss_grads_metrics(trainer, lambda m, i: LensGRPOTrainer._compute_loss(trainer, m, i), model, inputs)
    return stock, fused


def assert_close_to_stock(name: str, got, stock, atol: float = 0.0) -> None:
    got, stock = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(stock, dtype=torch.float64)
    err, scale = (got - stock).abs().max().item(), stock.abs().max().item()
    bound = max(STOCK_RTOL * max(scale, 1e-6), atol)
    assert err <= bound, f"{name}: fused {got.tolist()} vs TRL {stock.tolist()} (max error {err:.3g} > {bound:.3g})"


def assert_fused_equals_stock(stock, fused, where: str) -> None:
    (stock_loss, stock_grads, stock_metrics), (loss, grads, metrics) = stock, fused
    # an all-wrong group on-policy sums advantages that cancel (a loss of ~1e-10): fp32 noise of O(1) terms
    assert_close_to_stock(f"{where}: loss", loss, stock_loss, atol=LOSS_ATOL)
    assert set(grads) == set(stock_grads)
    for name, grad in grads.items():
        assert (grad is None) == (stock_grads[name] is None), f"{where}: {name} has a gradient on one side only"
        if grad is not None:
            assert_close_to_stock(f"{where}: d loss / d {name}", grad, stock_grads[name])
    assert set(metrics) == set(stock_metrics), f"{where}: metrics {sorted(metrics)} vs TRL's {sorted(stock_metrics)}"
    for key, values in metrics.items():
        assert_close_to_stock(f"{where}: metric {key}", values, stock_metrics[key])


def hand_batch(vocab: int, old: bool, ref: bool, tool: bool) -> dict:
    """One batch in TRL's generation-output layout: a left-padded prompt, a short and an empty
    completion, advantages of both signs, old log-probs spread wide enough that ratios are
    clipped on both sides, and a generation batch 3x this one (``num_items_in_batch``)."""
    g = torch.Generator().manual_seed(1)
    rows, prompt, width = 4, 3, 5
    completion_mask = torch.ones(rows, width, dtype=torch.long)
    completion_mask[1, 3:] = 0
    completion_mask[2] = 0
    prompt_mask = torch.ones(rows, prompt, dtype=torch.long)
    prompt_mask[0, 0] = 0
    batch = dict(prompt_ids=torch.randint(4, vocab, (rows, prompt), generator=g), prompt_mask=prompt_mask,
                 completion_ids=torch.randint(4, vocab, (rows, width), generator=g), completion_mask=completion_mask,
                 advantages=torch.tensor([1.2, -0.7, 0.5, -1.1]), num_items_in_batch=3 * completion_mask.sum())
    if old:
        batch["old_per_token_logps"] = -1.5 - 4 * torch.rand(rows, width, generator=g)
    if ref:
        batch["ref_per_token_logps"] = -2.5 - 2 * torch.rand(rows, width, generator=g)
    if tool:
        batch["tool_mask"] = torch.ones(rows, width, dtype=torch.long)
        batch["tool_mask"][0, 1:3] = 0
    return batch


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """The tiny model saved, so that TRL can build a reference model from its path (beta != 0)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(char_tokenizer()).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("loss_type, mode, old, extra", [
    ("grpo", "train", True, {}),
    ("bnpo", "eval", True, {}),
    ("dr_grpo", "train", False, {}),
    ("dapo", "train", True, {"tool": True}),
    ("dapo", "eval", True, {}),
    ("luspo", "train", True, {}),
    ("grpo", "train", True, {"beta": 0.1, "delta": 1.5}),
], ids=["grpo", "bnpo-eval", "dr_grpo-on-policy", "dapo-tool-mask", "dapo-eval", "luspo", "grpo-kl-two-sided"])
def test_fused_loss_equals_trl_loss_on_one_batch(tmp_path, saved_model, loss_type, mode, old, extra):
    """Loss, the gradient of every parameter and every logged metric, with gradient
    accumulation 2 in train mode (TRL's normalisers of each loss_type, an empty row)."""
    beta, delta, tool = extra.get("beta", 0.0), extra.get("delta"), extra.get("tool", False)
    config = dict(loss_type=loss_type, beta=beta, delta=delta, use_bias_correction_kl=False, epsilon=0.2,
                  steps_per_generation=3, **FP32)
    trainer = make_trainer(LensGRPOTrainer, tmp_path, RecordingReward(), model=saved_model if beta else None,
                           lens_fused_loss=True, **config)
    assert trainer.uses_fused_loss and (trainer.ref_model is not None) == (beta != 0)
    trainer.model.train(mode == "train")
    trainer.current_gradient_accumulation_steps = 2
    batch = hand_batch(trainer.model.config.vocab_size, old, beta != 0, tool)
    stock, fused = stock_and_fused(trainer, trainer.model, batch)
    assert_fused_equals_stock(stock, fused, f"{loss_type} ({mode})")
    clip = stock[2]["clip_ratio/region_mean"][0]
    assert (clip > 0) == old, "the batch should clip ratios exactly when old log-probs are given"


class DualLossTrainer(LensGRPOTrainer):
    """Trains with the fused loss; each loss step also records TRL's on the same inputs."""

    def _compute_loss(self, model, inputs):
        stock, fused = stock_and_fused(self, model, inputs)
        detach = lambda result: (result[0].detach(), *result[1:])  # noqa: E731
        self.loss_records.append({"stock": detach(stock), "fused": detach(fused)})
        for key, values in fused[2].items():  # the step logs the fused loss's metrics
            self._metrics["train"][key].extend(values)
        return fused[0]


@pytest.fixture(scope="module")
def two_step_runs(tmp_path_factory):
    """Two steps with TRL's loss and two with the fused one (same model, data, seed): one
    generation (num_iterations=2), so the second step's ratios move and clip."""
    settings = dict(num_iterations=2, epsilon=0.05, **FP32)
    stock = train(LensGRPOTrainer, tmp_path_factory.mktemp("stock-loss"), RecordingReward(), lens_fused_loss=False,
                  **settings)
    fused = train(DualLossTrainer, tmp_path_factory.mktemp("fused-loss"), RecordingReward(), lens_fused_loss=True,
                  **settings)
    return stock, fused


def test_fused_training_equals_trl_loss_training_over_two_steps(two_step_runs):
    stock, fused = two_step_runs
    assert not stock.uses_fused_loss and fused.uses_fused_loss
    assert len(fused.loss_records) == 2
    for step, record in enumerate(fused.loss_records):  # same inputs, same parameters: TRL's loss and the fused one
        assert_fused_equals_stock(record["stock"], record["fused"], f"step {step + 1}")
    assert fused.loss_records[1]["fused"][2]["clip_ratio/region_mean"][0] > 0
    keys = ["loss", "grad_norm", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
            "clip_ratio/low_min", "clip_ratio/high_max", "lens/confidence_mean"]
    for key in keys:  # the two runs, as logged
        assert_close_to_stock(f"logged {key}", step_logs(fused, key), step_logs(stock, key), atol=LOSS_ATOL)
    assert len(step_logs(fused, "loss")) == 2
