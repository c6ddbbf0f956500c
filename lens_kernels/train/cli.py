"""Console scripts ``lens-train`` and ``lens-eval``."""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .config import (
    TrainConfig, add_config_flags, flag_overrides, load_yaml, resolve_config,
)

# The options lens-eval reads (the others are training options: no flag for them).
EVAL_OPTIONS = [
    "model", "eval_data", "eval_samples", "eval_ks", "eval_prompts", "temperature", "top_p",
    "max_new_tokens", "prompt_template", "use_chat_template", "max_prompt_tokens", "verifier",
    "verify_timeout", "verify_workers", "device", "bf16", "seed", "rollout", "plugins",
    "toy_eval_size", "generation_batch_prompts", "cpu_threads", "vllm_gpu_memory_utilization",
    "progress",
]


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lens-train",
        description="LENS / GRPO training with lens_kernels.fused_lens_loss.  Without --model "
        "(and without a YAML file naming one) it runs the embedded default: a tiny model made "
        "on the spot, a supervised warm start on toy arithmetic, then RL once per mode.",
    )
    parser.add_argument("--config", help="YAML file of options (flags override it)")
    parser.add_argument("--results-json", metavar="PATH", help="also write the command, machine, versions, "
                        "commit, wall time, load average, options and every metric record to PATH")
    add_config_flags(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    config = resolve_config(args.config, flag_overrides(args))
    _logging()
    from .checkpoint import CheckpointError
    from .report import comparison_table, load_average, plot_curves, results_document, write_results
    from .trainer import run

    load_at_start = load_average()
    began = time.perf_counter()
    try:
        results = run(config)
    except CheckpointError as err:  # a damaged run directory: said once, without a traceback
        print(f"lens-train: error: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - began
    run_dir = Path(config.run_dir)
    if any("eval/pass@1" in r for recs in results.values() for r in recs):
        print(comparison_table(results, config.eval_ks))
    plot = plot_curves(results, run_dir / "curves.png",
                       title=f"{config.model or 'embedded tiny model'}: " + " vs ".join(results))
    print(f"\n{' and '.join(results)} done in {elapsed:.0f} s; metrics in "
          f"{run_dir}/<mode>/metrics.jsonl, plot {plot}")
    if args.results_json:
        command = shlex.join(["lens-train", *argv])
        document = results_document(command, config, results, elapsed, load_at_start)
        print(f"results in {write_results(Path(args.results_json), document)}")
    return 0


def eval_config(args: argparse.Namespace) -> TrainConfig:
    """Options saved with the checkpoint (if any) < YAML < flags."""
    values = {}
    saved = Path(args.model) / "lens_train_config.yaml"
    if saved.exists():
        values.update(load_yaml(str(saved)))
    if args.config:
        values.update(load_yaml(args.config))
    values.update(flag_overrides(args))
    return TrainConfig.from_dict(values)


def eval_table(result: dict, ks: Sequence[int]) -> str:
    subsets = sorted({k.rsplit("/pass@", 1)[0] for k in result if "/pass@" in k},
                     key=lambda s: (s != "eval", s != "eval/hard", s))
    lines = ["| subset | problems | " + " | ".join(f"pass@{k}" for k in ks) + " |",
             "|---|---:|" + "---:|" * len(ks)]
    for name in subsets:
        label = {"eval": "all", "eval/hard": "levels 4-5"}.get(name, name.split("/", 1)[-1])
        cells = [f"{result[f'{name}/pass@{k}']:.3f}" for k in ks]
        lines.append(f"| {label} | {result[f'{name}/problems']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lens-eval",
        description="pass@k (unbiased, n samples per problem) of a model, overall, per level "
        "and on levels 4-5.  Options saved with a lens-train checkpoint are used by default.",
    )
    parser.add_argument("--config", help="YAML file of options (flags override it)")
    parser.add_argument("--out", help="write the results as JSON here")
    add_config_flags(parser, EVAL_OPTIONS)
    args = parser.parse_args(argv)
    if not getattr(args, "model", None):
        parser.error("--model PATH is required")
    config = eval_config(args)
    if not config.eval_data:
        parser.error("--eval-data is empty: nothing to evaluate")
    _logging()
    from .data import load_problems
    from .engines import make_engine
    from .evaluate import evaluate
    from .rewards import make_verifier
    from .trainer import Task, load_policy, seed_everything, setup

    setup(config)
    seed_everything(config.seed)
    policy = load_policy(config.model, config)
    problems = load_problems(config.eval_data, config.toy_eval_size, config.seed + 1)
    task = Task(problems[: config.eval_prompts or None], policy, config)
    engine = make_engine(config.rollout, policy, config.model, config)
    verifier = make_verifier(config.verifier, config)
    try:
        result = evaluate(engine, verifier, task.problems, task.prompt_ids, config.eval_samples,
                          config.eval_ks, config.temperature, config.top_p,
                          config.max_new_tokens,
                          config.generation_batch_prompts or config.prompts_per_step,
                          seed=config.seed, progress=config.progress)
    finally:
        verifier.close()
        engine.close()
    print(eval_table(result, config.eval_ks))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0
