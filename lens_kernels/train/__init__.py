"""A thin LENS/GRPO trainer on top of ``lens_kernels.fused_lens_loss``.

Rollouts (transformers ``generate`` or vLLM), verifiable math rewards (math-verify on the last
``\\boxed{}``), PPO epochs with the fused loss, pass@k evaluation, atomic checkpoints with exact
resume.  Console scripts: ``lens-train`` and ``lens-eval`` (also ``python -m lens_kernels.train``).
Needs the ``[train]`` extra: transformers, math-verify, pyyaml, tqdm, matplotlib.
"""
from .config import MODES, TOY_DEFAULTS, TrainConfig, resolve_config
from .evaluate import pass_at_k
from .rewards import VERIFIERS, Verdict, register_verifier
from .trainer import run

__all__ = [
    "TrainConfig",
    "TOY_DEFAULTS",
    "MODES",
    "resolve_config",
    "run",
    "pass_at_k",
    "register_verifier",
    "VERIFIERS",
    "Verdict",
]
