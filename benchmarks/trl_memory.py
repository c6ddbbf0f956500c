"""Peak CPU memory of one GRPO loss step in TRL: TRL's own loss against ``lens_fused_loss``.

    python benchmarks/trl_memory.py [--out benchmarks/results/trl-memory-cpu.json]

One ``LensGRPOTrainer`` on a random 1-layer Llama (vocabulary 32000, built from a config), one
batch in TRL's generation-output layout (prompt 32 tokens, completions with a few padded
tails, old log-probs given), and per case one loss step, forward and backward:
``GRPOTrainer._compute_loss`` (TRL 1.16's fused log-prob head + PyTorch loss) and the
trainer's fused loss (``lk.fused_linear_lens_loss`` + the no-grad entropy pass for the metric).

Method: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of
PyTorch's CPU allocator during the step; the peak is the largest running sum of those events,
i.e. the memory the step needs on top of what was live before it (weights, batch). Parameter
gradients are cleared before each step, so both sides allocate them. Each step runs once
unmeasured first.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests/
warnings.simplefilter("ignore")

import trl  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from tests import test_integration_trl as t  # noqa: E402
from tests import test_integration_trl_loss as tl  # noqa: E402
from lens_kernels.bench import report  # noqa: E402
from lens_kernels.integrations.trl import LensGRPOTrainer  # noqa: E402

VOCAB, HIDDEN, PROMPT = 32000, 256, 32
CASES = [(8, 224), (16, 480)]  # (rows, completion length)
MiB = 2**20


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                        max_position_embeddings=1024, pad_token_id=0, eos_token_id=1,
                                        bos_token_id=2))


def batch(rows: int, width: int) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(rows, width, dtype=torch.long)
    for row in range(0, rows, 3):
        mask[row, width - 7 * (row + 1):] = 0  # some shorter completions
    return dict(prompt_ids=torch.randint(3, VOCAB, (rows, PROMPT), generator=g),
                prompt_mask=torch.ones(rows, PROMPT, dtype=torch.long),
                completion_ids=torch.randint(3, VOCAB, (rows, width), generator=g), completion_mask=mask,
                advantages=torch.randn(rows, generator=g), num_items_in_batch=mask.sum(),
                old_per_token_logps=-10.4 + 0.1 * torch.randn(rows, width, generator=g))


def measure(trainer, inputs) -> dict:
    def step(compute):
        def run():
            trainer.model.zero_grad(set_to_none=True)
            compute(trainer.model, inputs).backward()
        return run

    stock = step(lambda m, i: trl.GRPOTrainer._compute_loss(trainer, m, i))
    fused = step(trainer._compute_loss)
    result = {}
    for name, run in (("trl_loss", stock), ("fused_loss", fused)):
        run()
        result[f"{name}_peak_mib"] = round(tl.peak_bytes(run) / MiB, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "trl-memory-cpu.json"))
    out = Path(parser.parse_args().out)
    logging.getLogger("trl").setLevel(logging.ERROR)
    results = []
    for bf16 in (False, True):
        trainer = t.make_trainer(LensGRPOTrainer, "/tmp/lens-trl-memory", t.RecordingReward(), model=model(),
                                 lens_fused_loss=True, bf16=bf16)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        for rows, width in CASES:
            inputs = batch(rows, width)
            row = dict(autocast="bf16" if bf16 else "none (fp32)", rows=rows, prompt=PROMPT, completion=width,
                       completion_tokens=int(inputs["completion_mask"].sum()), vocab=VOCAB, hidden=HIDDEN,
                       **measure(trainer, inputs))
            print(row, flush=True)
            results.append(row)
    record = dict(
        what="peak CPU memory of one GRPO loss step (forward + backward), TRL's loss vs lens_fused_loss",
        method="torch.profiler(profile_memory=True): largest running sum of PyTorch CPU allocator events during "
               "the step (memory on top of the weights and the batch); gradients cleared before each step; one "
               "unmeasured run first",
        model=f"random 1-layer Llama, hidden {HIDDEN}, vocabulary {VOCAB}, untied lm_head",
        versions=dict(torch=torch.__version__, trl=trl.__version__, python=platform.python_version()),
        machine=platform.machine(), results=results,
        command="python benchmarks/trl_memory.py " + " ".join(sys.argv[1:]),
        git_commit=report.git_commit() or "unknown",
        date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
