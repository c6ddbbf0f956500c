"""The RL loop: sample, score, old log-probs, PPO epochs with the fused loss; evaluate, log,
checkpoint.  ``run(config)`` trains every mode in ``config.modes`` from the same start and seed,
each in ``run_dir/<mode>``, and resumes any of them from its latest checkpoint.
"""
from __future__ import annotations

import importlib
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .checkpoint import (
    CheckpointError, atomic_write_text, checkpoint_problem, quiet_transformers, resume_point,
    save_checkpoint, save_model, set_rng_state,
)
from .config import TrainConfig, load_yaml
from .data import Problem, PromptSampler, load_problems
from .engines import make_engine
from .evaluate import evaluate
from .metrics import MetricsLog
from .policy import Policy
from .ppo import ppo_update
from .rewards import make_verifier
from .warm_start import supervised_warm_start

log = logging.getLogger("lens_kernels.train")

# Options that may change between a run and its resumption (everything else must match);
# run_dir, so that a run directory can be moved.
RESUMABLE_CHANGES = ("steps", "progress", "eval_every", "save_every", "keep_checkpoints", "run_dir")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(config: TrainConfig) -> None:
    if config.cpu_threads > 0:
        torch.set_num_threads(config.cpu_threads)
    for module in config.plugins:
        importlib.import_module(module)


def load_policy(path, config: TrainConfig, verified: bool = False) -> Policy:
    """The model and tokenizer of ``path``; a damaged local folder is named, not half-loaded
    (its content hashes are not read again when ``verified``, e.g. by ``resume_point``)."""
    problem = checkpoint_problem(Path(path), contents=not verified) if Path(path).is_dir() else None
    if problem:
        raise CheckpointError(f"cannot load the model of {path}: {problem}")
    with quiet_transformers():
        return Policy.load(str(path), config.device, config.bf16, config.gradient_checkpointing)


class Task:
    """Problems with their prompt token ids; prompts longer than ``max_prompt_tokens`` dropped."""

    def __init__(self, problems: Sequence[Problem], policy: Policy, config: TrainConfig):
        texts = [config.prompt_template.format(problem=p.problem) for p in problems]
        ids = policy.encode_prompts(texts, config.use_chat_template)
        keep = [i for i, t in enumerate(ids) if len(t) <= config.max_prompt_tokens]
        if len(keep) < len(problems):
            log.warning("dropped %d prompts longer than %d tokens", len(problems) - len(keep),
                        config.max_prompt_tokens)
        self.problems = [problems[i] for i in keep]
        self.prompt_ids = [ids[i] for i in keep]


def _check_resumable(run_dir: Path, config: TrainConfig) -> None:
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved = TrainConfig.from_dict(load_yaml(str(saved_path))).to_dict()
    now = config.to_dict()
    changed = sorted(k for k in now if now[k] != saved[k] and k not in RESUMABLE_CHANGES)
    if changed:
        raise ValueError(
            f"{run_dir} holds a run with different options {changed}; resume it with the same "
            "options or choose another --run-dir"
        )


def prepare_start(config: TrainConfig, run_dir: Path) -> Path:
    """The policy every mode starts from: ``config.model`` or the embedded tiny model, after the
    optional supervised warm start (saved once in ``run_dir/start``, reused on resume)."""
    start = run_dir / "start"
    if config.model and not config.warm_start_steps:
        return Path(config.model)
    if (start / "config.json").exists():
        return start
    seed_everything(config.seed)
    if config.model:
        policy = load_policy(config.model, config)
    else:
        from .toy import build_toy_model, build_toy_tokenizer

        tokenizer = build_toy_tokenizer()
        model = build_toy_model(tokenizer, config.toy_hidden_size, config.toy_layers,
                                config.toy_heads, config.seed)
        policy = Policy.wrap(model, tokenizer, config.device, config.bf16,
                             config.gradient_checkpointing)
    task = Task(load_problems(config.train_data, config.toy_train_size, config.seed), policy, config)
    began = time.perf_counter()
    losses = supervised_warm_start(policy, task.problems, task.prompt_ids, config.warm_start_steps,
                                   config.warm_start_lr, config.warm_start_batch, config.seed,
                                   config.loss_backend)
    log.info("warm start: %d steps in %.1f s, final loss %.3f", len(losses),
             time.perf_counter() - began, losses[-1] if losses else float("nan"))
    save_model(start, policy.model, policy.tokenizer)
    return start


def run(config: TrainConfig) -> dict[str, list[dict]]:
    """Train every mode of ``config.modes``; returns each mode's metric records."""
    setup(config)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_resumable(run_dir, config)
    atomic_write_text(run_dir / "config.yaml", config.to_yaml())
    start = prepare_start(config, run_dir)
    verifier = make_verifier(config.verifier, config)
    try:
        return {
            mode: train_mode(config, mode, start, run_dir / mode, verifier, announce=i == 0)
            for i, mode in enumerate(config.modes)
        }
    finally:
        verifier.close()


def train_mode(config: TrainConfig, mode: str, start: Path, out_dir: Path, verifier,
               announce: bool = True) -> list[dict]:
    """One mode's RL run; ``announce`` logs the loss path (once per run, not per mode)."""
    from tqdm.auto import tqdm

    ckpt_dir = out_dir / "checkpoints"
    for stale in ckpt_dir.glob(".*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    resume = resume_point(ckpt_dir)
    ckpt = resume.path if resume else None
    seed_everything(config.seed)
    policy = load_policy(ckpt or start, config, verified=ckpt is not None)
    if announce:
        log.info("loss path: %s", policy.loss_path)
    ref = None
    if config.kl_beta > 0:
        ref = load_policy(start, config)
        ref.model.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    train = Task(load_problems(config.train_data, config.toy_train_size, config.seed), policy,
                 config)
    evals = None
    if config.eval_data:
        problems = load_problems(config.eval_data, config.toy_eval_size, config.seed + 1)
        evals = Task(problems[: config.eval_prompts or None], policy, config)
    sampler = PromptSampler(len(train.problems), config.seed)
    step = 0
    if ckpt is not None:
        state = resume.state
        optimizer.load_state_dict(state["optimizer"])
        sampler = PromptSampler.from_state(state["sampler"])
        set_rng_state(state["rng"])
        step = state["step"]
        log.info("%s: resuming from %s (step %d)", mode, ckpt, step)
    metrics = MetricsLog(out_dir / "metrics.jsonl", step if ckpt is not None else -1)
    engine = make_engine(config.rollout, policy, str(ckpt or start), config)

    def run_eval(at_step: int) -> dict:
        began = time.perf_counter()
        out = evaluate(engine, verifier, evals.problems, evals.prompt_ids, config.eval_samples,
                       config.eval_ks, config.temperature, config.top_p, config.max_new_tokens,
                       config.generation_batch_prompts or config.prompts_per_step,
                       seed=config.seed * 7919 + at_step)
        out["time_eval"] = time.perf_counter() - began
        return out

    if step == 0 and evals is not None:
        metrics.append({"step": 0, **run_eval(0)})
    bar = tqdm(total=config.steps, initial=step, desc=mode, disable=not config.progress)
    try:
        while step < config.steps:
            step += 1
            record = train_step(step, config, mode, policy, ref, engine, optimizer, verifier,
                                train, sampler)
            if evals is not None and (step % config.eval_every == 0 or step == config.steps):
                record.update(run_eval(step))
            metrics.append(record)
            bar.update(1)
            bar.set_postfix(acc=f"{record['accuracy']:.2f}",
                            neg=f"{record['negative_group_fraction']:.2f}")
            if step % config.save_every == 0 or step == config.steps:
                save_checkpoint(ckpt_dir, step, policy.model, policy.tokenizer, optimizer,
                                {"sampler": sampler.state_dict(), "mode": mode},
                                config.keep_checkpoints, config.to_yaml())
    finally:
        bar.close()
        engine.close()
    return metrics.records


def level_accuracy(levels: Sequence[Optional[int]], statuses: Sequence[str], G: int) -> dict:
    """``accuracy/level{L}``: the share of correct completions among the prompts of level L
    (``levels`` has one entry per prompt, ``statuses`` G per prompt, in the same order)."""
    correct: dict[int, list[int]] = {}
    for i, level in enumerate(levels):
        if level is not None:
            correct.setdefault(level, []).extend(s == "correct" for s in statuses[i * G:(i + 1) * G])
    return {f"accuracy/level{L}": sum(v) / len(v) for L, v in sorted(correct.items())}


def train_step(step: int, config: TrainConfig, mode: str, policy: Policy, ref: Optional[Policy],
               engine, optimizer, verifier, task: Task, sampler: PromptSampler) -> dict:
    G = config.group_size
    clock = time.perf_counter
    t0 = clock()
    idx = sampler.next(config.prompts_per_step)
    rollout = engine.generate([task.prompt_ids[i] for i in idx], G, config.temperature,
                              config.top_p, config.max_new_tokens, seed=config.seed * 1_000_003 + step)
    t1 = clock()
    verdicts = verifier.score(rollout.texts, [task.problems[i].answer for i in idx for _ in range(G)])
    rewards = torch.tensor([v.reward for v in verdicts], dtype=torch.float32, device=policy.device)
    t2 = clock()
    old = policy.logprobs(rollout, config.temperature, config.micro_batch_rows, config.loss_backend)
    ref_lp = None if ref is None else ref.logprobs(rollout, config.temperature,
                                                   config.micro_batch_rows, config.loss_backend)
    t3 = clock()
    stats = ppo_update(policy, optimizer, rollout, rewards, old, ref_lp, config, mode,
                       measure_grad_share=config.grad_share_every > 0
                       and step % config.grad_share_every == 0)
    t4 = clock()
    engine.sync(policy.model)
    t5 = clock()
    mask = rollout.completion_mask
    grouped = rewards.view(-1, G)
    statuses = [v.status for v in verdicts]
    return {
        "step": step,
        "reward_mean": float(rewards.mean()),
        "accuracy": statuses.count("correct") / len(statuses),
        "negative_group_fraction": float((grouped.amax(1) == 0).float().mean()),
        "all_correct_group_fraction": float((grouped.amin(1) == 1).float().mean()),
        **stats,
        **level_accuracy([task.problems[i].level for i in idx], statuses, G),
        "response_length": float(mask.sum(1).float().mean()),
        "sampler_logprob_gap": float(((rollout.sampler_logprobs - old).abs() * mask).sum()
                                     / mask.sum().clamp(min=1)),
        "no_answer_fraction": statuses.count("no_answer") / len(statuses),
        "verify_timeouts": statuses.count("timeout"),
        "verify_errors": statuses.count("error"),
        "time_rollout": t1 - t0,
        "time_reward": t2 - t1,
        "time_old_logprobs": t3 - t2,
        "time_update": t4 - t3,
        "time_sync": t5 - t4,
        "time_step": t5 - t0,
    }
