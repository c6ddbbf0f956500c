"""Every option of the trainer, in one dataclass, with YAML and command-line round trips.

Defaults are the paper's (section 6 and Appendix D.1): G = 16 completions for each of 32
prompts per step, temperature 1.0, top-p 1.0, clip 0.2, alpha 0.25, no KL, learning rate 1e-6.
Without a ``model`` the trainer runs the embedded default instead: ``TOY_DEFAULTS`` is laid
over these values (a tiny model built on the spot, a larger learning rate, short answers).
Precedence, lowest first: dataclass defaults, ``TOY_DEFAULTS`` (only when no model is named),
the YAML file, command-line flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

MODES = ("lens", "grpo", "lens-mixed-only", "lens-negative-only")


def _opt(default: Any, help_text: str):
    """A dataclass field with its ``--help`` text (lists get a fresh copy per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


@dataclass
class TrainConfig:
    """Options of ``lens-train`` (each is also a flag: ``group_size`` -> ``--group-size``)."""

    # --- run -------------------------------------------------------------------------------
    model: Optional[str] = _opt(None, "local transformers causal-LM folder; unset: the embedded "
                                "tiny model")
    run_dir: str = _opt("runs/lens", "checkpoints, metrics.jsonl and plot; a sub-folder per mode")
    seed: int = _opt(0, "seed of everything (data order, sampling, initialisation)")
    device: str = _opt("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    bf16: bool = _opt(True, "bf16 autocast on a GPU (weights stay fp32); ignored on a CPU")
    gradient_checkpointing: bool = _opt(True, "gradient checkpointing on a GPU")
    cpu_threads: int = _opt(0, "torch.set_num_threads when > 0")
    plugins: list[str] = _opt([], "modules to import first (to register verifiers)")
    # --- data ------------------------------------------------------------------------------
    train_data: str = _opt("toy", "'toy' (generated arithmetic) or a MATH-style JSONL file")
    eval_data: str = _opt("toy", "'toy', a JSONL file, or '' for no evaluation")
    prompt_template: str = _opt(
        "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
        "str.format template of the prompt, with {problem}",
    )
    use_chat_template: bool = _opt(False, "wrap the prompt in the tokenizer's chat template")
    max_prompt_tokens: int = _opt(1024, "longer prompts are dropped")
    toy_train_size: int = _opt(4000, "toy training problems")
    toy_eval_size: int = _opt(200, "toy evaluation problems (drawn with seed + 1)")
    # --- rollouts --------------------------------------------------------------------------
    rollout: str = _opt("hf", "hf (transformers generate) or vllm")
    group_size: int = _opt(16, "G, completions per prompt")
    prompts_per_step: int = _opt(32, "prompts sampled per step")
    temperature: float = _opt(1.0, "sampling temperature (also passed to the loss)")
    top_p: float = _opt(1.0, "nucleus sampling; 1.0 = plain sampling")
    max_new_tokens: int = _opt(4096, "completion length cap")
    generation_batch_prompts: int = _opt(0, "prompts per generate call; 0 = all of a step's prompts at "
                                        "once (and prompts_per_step at a time in evaluation)")
    vllm_gpu_memory_utilization: float = _opt(0.4, "GPU memory share of the vLLM engine")
    # --- rewards ---------------------------------------------------------------------------
    verifier: str = _opt("math-verify", "a name in lens_kernels.train.VERIFIERS")
    verify_timeout: float = _opt(10.0, "seconds per answer before its worker is killed")
    verify_workers: int = _opt(1, "verifier worker processes")
    # --- loss (passed to lens_kernels.fused_lens_loss) -------------------------------------
    modes: list[str] = _opt(["lens"], "loss modes, comma-separated, each trained from the same "
                            f"start and seed: {', '.join(MODES)}")
    alpha: float = _opt(0.25, "weight of negative groups (LENS)")
    clip_low: float = _opt(0.2, "PPO clip below 1 (eps_low)")
    clip_high: float = _opt(0.2, "PPO clip above 1 (eps_high)")
    clip_ratio_c: Optional[float] = _opt(None, "dual-clip constant (> 1) for negative advantages")
    kl_beta: float = _opt(0.0, "k3 KL weight; > 0 keeps a frozen copy of the starting policy")
    loss_agg_mode: str = _opt("seq-mean-token-mean", "token aggregation of the loss")
    scale_by_std: bool = _opt(True, "divide advantages by the group std (off: Dr.GRPO)")
    length_gamma: Optional[float] = _opt(None, "preference-aware variant (Appendix C)")
    loss_backend: str = _opt("auto", "auto, torch, triton or cuda")
    # --- optimisation ----------------------------------------------------------------------
    steps: int = _opt(500, "RL steps per mode")
    lr: float = _opt(1e-6, "AdamW learning rate")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient-norm clipping")
    ppo_epochs: int = _opt(1, "passes over each step's samples")
    minibatch_prompts: int = _opt(0, "prompts per optimizer update; 0 = all of the step")
    micro_batch_rows: int = _opt(0, "rows per forward/backward (accumulated); 0 = minibatch")
    # --- supervised warm start (before RL, shared by every mode) ---------------------------
    warm_start_steps: int = _opt(0, "supervised steps on prompt -> \\boxed{answer} first")
    warm_start_lr: float = _opt(1e-3, "warm-start learning rate")
    warm_start_batch: int = _opt(64, "warm-start batch size")
    # --- evaluation, logging, checkpoints --------------------------------------------------
    eval_every: int = _opt(50, "steps between evaluations (also at the start and the end)")
    eval_samples: int = _opt(16, "n completions per problem for the unbiased pass@k")
    eval_ks: list[int] = _opt([1, 2, 4, 8, 16], "k values of pass@k")
    eval_prompts: int = _opt(0, "evaluation problems used; 0 = all")
    save_every: int = _opt(50, "steps between checkpoints (also at the end)")
    keep_checkpoints: int = _opt(2, "checkpoints kept")
    progress: bool = _opt(True, "progress bar")
    grad_share_every: int = _opt(1, "steps between measurements of the negative groups' share of "
                                 "the gradient (0 = never; each costs one extra forward/backward "
                                 "over the negative groups of one minibatch)")
    # --- embedded tiny model (used when model is unset) ------------------------------------
    toy_hidden_size: int = _opt(96, "tiny model width")
    toy_layers: int = _opt(2, "tiny model layers")
    toy_heads: int = _opt(4, "tiny model attention heads")

    def __post_init__(self) -> None:
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"modes: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if len(set(self.modes)) != len(self.modes) or not self.modes:
            raise ValueError(f"modes: expected distinct modes, got {self.modes}")
        if self.group_size < 2:
            raise ValueError(f"group_size: expected >= 2, got {self.group_size}")
        if self.rollout not in ("hf", "vllm"):
            raise ValueError(f"rollout: expected 'hf' or 'vllm', got {self.rollout!r}")
        mb = self.minibatch_prompts
        if mb < 0 or (mb and self.prompts_per_step % mb):
            raise ValueError(
                f"minibatch_prompts: expected 0 or a divisor of prompts_per_step "
                f"({self.prompts_per_step}), got {mb}"
            )
        if self.grad_share_every < 0:
            raise ValueError(f"grad_share_every: expected >= 0, got {self.grad_share_every}")
        if self.eval_ks and max(self.eval_ks) > self.eval_samples:
            raise ValueError(
                f"eval_ks: largest k ({max(self.eval_ks)}) exceeds eval_samples "
                f"({self.eval_samples})"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; see lens-train --help")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})


# The embedded default: a tiny model learns the toy task on a CPU in a few minutes.  The
# learning rate is the one knob that must differ from the paper's (a 0.3M-parameter model
# trained from scratch needs a far larger step than a pretrained 3B one).
TOY_DEFAULTS: dict[str, Any] = {
    "run_dir": "runs/toy",
    "prompt_template": "{problem}",
    "max_new_tokens": 8,
    "modes": ["lens", "grpo"],
    "steps": 150,
    "lr": 3e-4,
    "minibatch_prompts": 8,
    "warm_start_steps": 150,
    "eval_every": 15,
    "save_every": 50,
    "cpu_threads": 2,
}


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    return values


def resolve_config(yaml_path: Optional[str], overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < TOY_DEFAULTS (no model named) < YAML < ``overrides`` (command line)."""
    merged = dict(load_yaml(yaml_path)) if yaml_path else {}
    merged.update(overrides)
    base = {} if merged.get("model") else dict(TOY_DEFAULTS)
    base.update(merged)
    return TrainConfig.from_dict(base)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check/convert one YAML or flag value to the field's type (ints become floats, etc.)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return _coerce(name, value, next(a for a in args if a is not type(None)))
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        return [_coerce(name, v, args[0]) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{name}: unsupported option type {hint}")


def _as_flag(value: Any) -> Any:
    """A default as it is written on the command line: lists comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, list) else value


def add_config_flags(parser: argparse.ArgumentParser, names: Optional[list[str]] = None) -> None:
    """One flag per field (``--group-size``), default unset so that only given flags override."""
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if names is not None and f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default {_as_flag(getattr(defaults, f.name))!r}" + (
            f"; embedded default {_as_flag(TOY_DEFAULTS[f.name])!r})" if f.name in TOY_DEFAULTS else ")"
        )
        help_text = help_text.replace("%", "%%")
        if hints[f.name] is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS, help=help_text,
            )
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_text)


def flag_overrides(namespace: argparse.Namespace) -> dict[str, Any]:
    """The config fields that were given on the command line (raw strings, coerced later)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(namespace).items() if k in names}
