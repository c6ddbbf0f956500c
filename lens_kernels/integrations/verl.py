"""LENS advantage estimators, and the ``impl_backend=lens`` fused forward, for verl
(https://github.com/volcengine/verl).

Importing this module (verl does it on ``import verl`` through the ``verl.plugins`` entry point
that ``lens-kernels`` installs) registers three advantage estimators with
``verl.trainer.ppo.core_algos.register_adv_est``:

- ``lens``: LENS (``algorithm.lens.mode`` may pick any mode of :func:`lens_kernels.lens_advantages`);
- ``lens-mixed-only`` and ``lens-negative-only``: the paper's Table 3 ablations.

Enable with ``algorithm.adv_estimator=lens``; options live under ``algorithm.lens``
(``alpha``, ``scale_by_std``, ``std_eps``, ``length_gamma``, ``mode``), e.g.
``+algorithm.lens.alpha=0.25`` on verl's Hydra command line.

LENS needs each response's confidence under the sampling policy, i.e. ``old_log_probs``.
verl 0.9.x calls a registered estimator with rewards, mask, config and uids only, so
:mod:`lens_kernels.integrations._verl_compat` wraps verl's ``compute_advantage`` (in the
releases it recognises) to hand the batch to these estimators. The estimators also accept
``old_log_probs=`` and ``batch=`` directly, so they keep working once verl passes them.

On verl 0.9.1, ``actor_rollout_ref.model.fused_kernel_options.impl_backend=lens`` (with
``use_fused_kernels=True``) makes verl's actor and reference forward compute log-probs and
entropy with :func:`lens_kernels.fused_linear_token_logprobs`: see :mod:`.verl_fused`.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from .. import lens_advantages_from_stats
from . import _verl_compat, verl_fused

#: estimator name -> fixed LENS mode (``None``: ``algorithm.lens.mode``, default ``"lens"``)
ESTIMATORS = {"lens": None, "lens-mixed-only": "lens-mixed-only", "lens-negative-only": "lens-negative-only"}
#: keys accepted under ``algorithm.lens`` and their defaults (``scale_by_std`` defaults to
#: ``algorithm.norm_adv_by_std_in_grpo``)
OPTION_DEFAULTS = {"mode": "lens", "alpha": 0.25, "scale_by_std": None, "std_eps": 1e-6, "length_gamma": None}


def _get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` for a dict, an OmegaConf ``DictConfig`` or a verl dataclass config."""
    if config is None:
        return default
    if hasattr(config, "get"):
        try:
            return config.get(key, default)
        except (AttributeError, KeyError, TypeError):
            pass
    return getattr(config, key, default)


def check_filter_groups(config: Any, estimator: Optional[str] = None) -> None:
    """Raise if DAPO's dynamic sampling (``algorithm.filter_groups``) is on with a LENS estimator.

    ``config`` is verl's ``algorithm`` config. Dynamic sampling drops every group whose rewards
    have zero std, all-wrong groups included: exactly the groups LENS learns from.
    """
    estimator = estimator if estimator is not None else _name(_get(config, "adv_estimator"))
    if estimator not in ESTIMATORS:
        return
    filter_groups = _get(config, "filter_groups")
    if filter_groups is not None and bool(_get(filter_groups, "enable", False)):
        raise ValueError(
            f"algorithm.filter_groups.enable=True cannot be used with algorithm.adv_estimator={estimator}: "
            "DAPO dynamic sampling drops every zero-std group, including the all-wrong (negative) groups "
            "that LENS turns into a learning signal. Set algorithm.filter_groups.enable=False."
        )


def lens_options(config: Any, estimator: str = "lens") -> dict:
    """Keyword options for :func:`lens_kernels.lens_advantages_from_stats` from ``algorithm``.

    Reads ``algorithm.lens.*``; unknown keys raise ``ValueError`` naming the key.
    """
    section = _get(config, "lens")
    given = {}
    if section is not None:
        keys = list(section.keys()) if hasattr(section, "keys") else list(vars(section))
        unknown = sorted(str(k) for k in keys if k not in OPTION_DEFAULTS)
        if unknown:
            raise ValueError(
                f"algorithm.lens.{unknown[0]}: unknown LENS option; expected one of {sorted(OPTION_DEFAULTS)}"
            )
        given = {k: _get(section, k) for k in keys}
    options = {k: given.get(k, v) for k, v in OPTION_DEFAULTS.items()}
    fixed = ESTIMATORS.get(estimator)
    if fixed is not None:
        if "mode" in given and given["mode"] != fixed:
            raise ValueError(
                f"algorithm.lens.mode={given['mode']!r} conflicts with algorithm.adv_estimator={estimator} "
                f"(which fixes mode={fixed!r}); drop algorithm.lens.mode or use adv_estimator=lens"
            )
        options["mode"] = fixed
    if options["scale_by_std"] is None:
        options["scale_by_std"] = bool(_get(config, "norm_adv_by_std_in_grpo", True))
    for key in ("alpha", "std_eps"):
        options[key] = float(options[key])
    if options["length_gamma"] is not None:
        options["length_gamma"] = float(options["length_gamma"])
    options["mode"] = str(options["mode"])
    options["scale_by_std"] = bool(options["scale_by_std"])
    return options


def _name(estimator: Any) -> Optional[str]:
    return getattr(estimator, "value", estimator) if estimator is not None else None


def _group_index(index: Any, batch: int, device: torch.device) -> torch.Tensor:
    """verl's per-response uids (any hashable labels) -> int64 group labels."""
    if index is None:
        raise ValueError("index: LENS needs each response's prompt uid (verl's non_tensor_batch['uid']) to form groups")
    labels = np.asarray(index, dtype=object)
    if labels.shape != (batch,):
        raise ValueError(f"index: expected {batch} uids (one per response), got shape {list(labels.shape)}")
    _, inverse = np.unique(labels.astype(str), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.long, device=device)


def _old_log_probs(old_log_probs: Optional[torch.Tensor], batch: Any) -> Optional[torch.Tensor]:
    """``old_log_probs`` as given, else from ``batch`` (a verl ``DataProto`` or its ``TensorDict``),
    else from the batch that the compute_advantage wrapper is handling."""
    if old_log_probs is not None:
        return old_log_probs
    for source in (batch, _verl_compat.current_batch()):
        if source is None:
            continue
        tensors = getattr(source, "batch", source)  # DataProto -> TensorDict
        try:
            if "old_log_probs" in tensors.keys():
                return tensors["old_log_probs"]
        except AttributeError:
            continue
    return None


def compute_lens_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any = None,
    index: Any = None,
    old_log_probs: Optional[torch.Tensor] = None,
    batch: Any = None,
    estimator: str = "lens",
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LENS advantages in verl's estimator convention.

    ``token_level_rewards [B, T]`` (summed per response: the outcome reward, in ``[0, 1]``),
    ``response_mask [B, T]``, ``config`` (verl's ``algorithm`` config), ``index`` (the prompt
    uid of each response), ``old_log_probs [B, T]`` (the sampling policy's log-probs; else read
    from ``batch``). Returns ``(advantages, returns)``, both ``[B, T]``: the per-response
    advantage broadcast over its response tokens, as verl's GRPO does. Other keyword
    arguments verl may pass (``reward_baselines``, ``non_tensor_batch``, ...) are ignored.
    """
    check_filter_groups(config, estimator)
    options = lens_options(config, estimator)
    old = _old_log_probs(old_log_probs, batch)
    if old is None:
        raise RuntimeError(_verl_compat.missing_old_log_probs_message(estimator))
    if old.shape != response_mask.shape:
        raise ValueError(
            f"old_log_probs: expected shape {list(response_mask.shape)} (response_mask's), got {list(old.shape)}"
        )
    mask = response_mask.bool()
    scores = token_level_rewards.sum(dim=-1)
    if scores.numel() and (not torch.isfinite(scores).all() or scores.min() < 0 or scores.max() > 1):
        raise ValueError(
            f"token_level_rewards: LENS needs each response's summed reward in [0, 1] (1 = correct), got values in "
            f"[{scores.min().item():g}, {scores.max().item():g}]; use a 0/1 reward function"
        )
    group_index = _group_index(index, scores.shape[0], scores.device)
    with torch.no_grad():
        old64 = old.detach().to(torch.float64)
        logp_sum = torch.where(mask, old64, torch.zeros_like(old64)).sum(dim=-1)
        n_tokens = mask.sum(dim=-1).to(torch.float64)
        result = lens_advantages_from_stats(
            logp_sum, n_tokens, scores.detach().to(torch.float64), group_index=group_index, **options
        )
    advantages = result.advantages.to(token_level_rewards.dtype).unsqueeze(-1) * response_mask
    return advantages, advantages.clone()


def _estimator(name: str):
    def estimator(token_level_rewards, response_mask, config=None, index=None,
                  old_log_probs=None, batch=None, **kwargs):
        return compute_lens_outcome_advantage(
            token_level_rewards, response_mask, config=config, index=index,
            old_log_probs=old_log_probs, batch=batch, estimator=name, **kwargs,
        )

    estimator.__name__ = "compute_" + name.replace("-", "_") + "_outcome_advantage"
    estimator.__doc__ = f"verl advantage estimator ``{name}``: see :func:`compute_lens_outcome_advantage`."
    return estimator


#: the functions registered with verl, by estimator name
ESTIMATOR_FUNCTIONS = {name: _estimator(name) for name in ESTIMATORS}


def register() -> None:
    """Register the estimators with verl and install the compute_advantage wrapper (idempotent)."""
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, register_adv_est

    for name, fn in ESTIMATOR_FUNCTIONS.items():
        existing = ADV_ESTIMATOR_REGISTRY.get(name)
        if existing is not None and existing is not fn and getattr(existing, "__module__", None) == __name__:
            del ADV_ESTIMATOR_REGISTRY[name]  # a reload of this module replaces its own entries
        register_adv_est(name)(fn)  # raises if another package registered the same name
    _verl_compat.install(set(ESTIMATORS), check_filter_groups, verl_fused.patches_for(_verl_compat.verl_version()))


register()
