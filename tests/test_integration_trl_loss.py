"""lens_fused_loss: TRL's GRPOTrainer loss by lk.fused_linear_lens_loss, against TRL's own
``_compute_loss`` (CPU, the tiny model and driving of test_integration_trl.py).

Loss, the gradient of every parameter and every logged metric: on one hand-made batch per
``loss_type``, over two training steps, and on two DDP processes; refusals and fallbacks;
bf16 autocast accuracy; the loss step's peak memory at V=32000. Skipped without TRL.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch

import lens_kernels as lk

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[trl]')")
    from transformers import LlamaConfig, LlamaForCausalLM

    from lens_kernels.integrations import trl_loss
    from lens_kernels.integrations.trl import LensGRPOConfig, LensGRPOTrainer
    from .conftest import runnable_backends
    from .test_integration_trl import (GROUP, RecordingReward, char_tokenizer, make_trainer, step_logs,
                                       tiny_llama, train)

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")

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


@pytest.mark.parametrize("config, message", [
    (dict(loss_type="cispo"), r"loss_type='cispo': its token loss is -min\(ratio, epsilon_high\)\.detach\(\)"),
    (dict(loss_type="sapo"), r"loss_type='sapo': it replaces the clipped surrogate by a sigmoid gate"),
    (dict(beta=0.1), r"beta != 0 with use_bias_correction_kl=True: .*set use_bias_correction_kl=False"),
    (dict(delta=1.1), r"delta=1.1: .* only for delta > 1 \+ epsilon_high = 1.2"),
    (dict(importance_sampling_level="sequence"), r"importance_sampling_level='sequence'"),
    (dict(top_entropy_quantile=0.2), r"top_entropy_quantile < 1"),
], ids=["cispo", "sapo", "kl-bias-correction", "delta-inside-clip", "sequence-ratio", "entropy-mask"])
def test_required_fused_loss_refuses_what_it_cannot_compute(tmp_path, config, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"lens_fused_loss=True, but lens_kernels' fused loss cannot .*" + message):
            LensGRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, lens_fused_loss=True, **config)


def test_fused_loss_falls_back_to_trl_loss_and_logs_why_once(tmp_path, caplog):
    """Where the fused loss does not apply, TRL's loss runs: a setting (logged when the trainer
    is built), a model (here a soft-capped head), a batch (here [B, T] advantages)."""
    caplog.set_level(logging.WARNING, logger="lens_kernels.integrations.trl")
    sapo = make_trainer(LensGRPOTrainer, tmp_path / "sapo", RecordingReward(), loss_type="sapo")
    capped = tiny_llama(char_tokenizer())
    capped.config.final_logit_softcapping = 30.0
    softcap = make_trainer(LensGRPOTrainer, tmp_path / "softcap", RecordingReward(), model=capped)
    assert not sapo.uses_fused_loss and not softcap.uses_fused_loss
    logged = [r.getMessage() for r in caplog.records]
    assert any("loss_type='sapo'" in m for m in logged) and any("final_logit_softcapping=30.0" in m for m in logged)
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30.0: logits the fused loss does not make"):
        make_trainer(LensGRPOTrainer, tmp_path / "required", RecordingReward(), model=capped, lens_fused_loss=True)

    trainer = make_trainer(LensGRPOTrainer, tmp_path / "per-token", RecordingReward(), **FP32)
    assert trainer.uses_fused_loss
    trainer.current_gradient_accumulation_steps = 1
    batch = hand_batch(trainer.model.config.vocab_size, old=True, ref=False, tool=False)
    batch["advantages"] = batch["advantages"][:, None].expand(-1, batch["completion_ids"].size(1))
    caplog.clear()
    for _ in range(2):
        stock, fused = stock_and_fused(trainer, trainer.model, batch)
        assert_fused_equals_stock(stock, fused, "fallback")
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 1 and "advantages of shape (4, 5)" in logged[0], logged


def test_fused_loss_under_bf16_autocast_no_less_accurate_than_trl(tmp_path):
    """TRL's default ``bf16=True`` autocasts (on CPU too): both heads read the hidden states and
    the weight in bf16. Against the float64 loss of those bf16 inputs (TRL's formulas through
    the reference and this integration's normaliser), the fused loss and its lm_head gradient
    are no further off than TRL's own."""
    trainer = make_trainer(LensGRPOTrainer, tmp_path, RecordingReward(), lens_fused_loss=True, bf16=True)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = hand_batch(trainer.model.config.vocab_size, old=True, ref=False, tool=False)
    stock, fused = stock_and_fused(trainer, trainer.model, batch)
    width = batch["completion_ids"].size(1)
    with trainer.accelerator.autocast():
        hidden = trainer.model.model(input_ids=torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
                                     attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1),
                                     ).last_hidden_state[:, -width - 1:-1]
    weight = trainer.model.lm_head.weight.detach().bfloat16().double().requires_grad_()
    gold = lk.reference.fused_lens_loss(
        hidden.detach().bfloat16().double() @ weight.T, batch["completion_ids"], batch["completion_mask"],
        torch.zeros(4), advantages=batch["advantages"].double(), old_logprobs=batch["old_per_token_logps"].double(),
    ).loss * trl_loss.loss_scale(trainer, batch, batch["completion_mask"], "train")
    gold_grad, = torch.autograd.grad(gold, weight)
    for name, got, ours, theirs in (("loss", gold, fused[0], stock[0]),
                                    ("d loss / d lm_head.weight", gold_grad, fused[1]["lm_head.weight"],
                                     stock[1]["lm_head.weight"])):
        err, trl_err = (ours.double() - got).abs().max().item(), (theirs.double() - got).abs().max().item()
        assert err <= trl_err + 1e-5 * got.abs().max().item(), f"{name}: error {err:.3g} > TRL's {trl_err:.3g}"


def peak_bytes(step) -> int:
    """Peak of PyTorch's CPU allocations while ``step()`` runs: the largest running sum of the
    allocator events ``torch.profiler(profile_memory=True)`` records (memory on top of what was
    live before)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def test_fused_loss_step_peak_memory_below_trl_at_vocabulary_32000(tmp_path):
    """One loss step (forward + backward) at V=32000; benchmarks/trl_memory.py records larger ones."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
    trainer = make_trainer(LensGRPOTrainer, tmp_path, RecordingReward(), model=model, lens_fused_loss=True, **FP32)
    trainer.current_gradient_accumulation_steps = 1
    g = torch.Generator().manual_seed(0)
    rows, width = 4, 64
    batch = dict(prompt_ids=torch.randint(3, 32000, (rows, 8), generator=g),
                 prompt_mask=torch.ones(rows, 8, dtype=torch.long),
                 completion_ids=torch.randint(3, 32000, (rows, width), generator=g),
                 completion_mask=torch.ones(rows, width, dtype=torch.long), advantages=torch.randn(rows, generator=g),
                 old_per_token_logps=torch.full((rows, width), -10.4))

    def step(compute):
        def run():
            trainer.model.zero_grad(set_to_none=True)
            compute(trainer.model, batch).backward()
        return run

    stock = peak_bytes(step(lambda m, i: trl.GRPOTrainer._compute_loss(trainer, m, i)))
    fused = peak_bytes(step(trainer._compute_loss))
    logits, mib = rows * width * 32000 * 4, 2**20
    assert fused < stock, f"fused loss step peak {fused / mib:.1f} MiB, TRL's {stock / mib:.1f} MiB"
    assert fused < logits, f"fused loss step peak {fused / mib:.1f} MiB >= one fp32 [B, T, V] {logits / mib:.1f} MiB"


def test_two_processes_gather_rewards_and_stats_across_ranks(tmp_path):
    """torchrun, 2 CPU processes: each group is split across the ranks, so LENS needs the gather;
    the fused loss runs through DDP and equals TRL's on each rank."""
    with socket.socket() as sock:  # a free port on the loopback for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = os.path.join(os.path.dirname(__file__), "_trl_two_process.py")
    env = {**os.environ, "LENS_OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), script],
                          capture_output=True, text=True, env=env, timeout=300)
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


@pytest.mark.parametrize("gemm", ["library", "triton"])
def test_fused_loss_on_the_triton_one_pass_path_equals_trl_loss(tmp_path, monkeypatch, gemm):
    """The path a GPU takes (Triton, one pass: the advantages are given), here through the
    interpreter: the gradient written during the forward reaches every parameter as TRL's does."""
    if "triton" not in runnable_backends():
        pytest.skip("Triton does not run here")
    monkeypatch.setattr(trl_loss, "fused_linear_lens_loss",
                        functools.partial(lk.fused_linear_lens_loss, backend="triton", gemm=gemm))
    trainer = make_trainer(LensGRPOTrainer, tmp_path, RecordingReward(), lens_fused_loss=True, loss_type="dapo",
                           delta=1.5, steps_per_generation=3, **FP32)
    trainer.current_gradient_accumulation_steps = 2
    batch = hand_batch(trainer.model.config.vocab_size, old=True, ref=False, tool=True)
    stock, fused = stock_and_fused(trainer, trainer.model, batch)
    assert_fused_equals_stock(stock, fused, f"triton, gemm={gemm}")
