"""Version-checked glue between verl and the LENS estimators of :mod:`.verl`.

verl 0.9.x calls a registered advantage estimator with ``token_level_rewards``,
``response_mask``, ``config``, ``index`` and ``reward_baselines`` only, although the batch
handed to ``compute_advantage`` already holds ``old_log_probs``. For the releases listed in
:data:`RECOGNISED_VERSIONS` (whose ``compute_advantage`` was read and tested), this module
wraps ``compute_advantage`` wherever verl binds it (the legacy trainer, the V1 trainer's
``compute_advantage_for_multi_trajectories``, the experimental separated trainer): when the
estimator is a LENS one, the wrapper runs verl's own function unchanged while exposing the
``DataProto`` to the estimator through a context variable. Other estimators pass straight
through. The modules are patched when they are imported (a ``sys.meta_path`` hook), so
loading the plugin on ``import verl`` stays cheap.

The same hook installs the ``impl_backend=lens`` fused forward of :mod:`.verl_fused` (its
``PATCHES``) on the recognised releases.

On a verl it does not recognise, nothing is wrapped: a loud ``RuntimeWarning`` (and a
``logging`` warning) says so, the estimators refuse to run unless verl itself passes
``old_log_probs=`` or ``batch=`` (as verl PR #7473 would), and ``impl_backend=lens`` stays
unknown to verl (its own fused backends are left alone).

Independently of the version, verl's ``validate_config`` gains the ``filter_groups`` check so
that the conflict is reported at start-up, before any rollout.
"""
from __future__ import annotations

import contextvars
import functools
import importlib.abc
import importlib.metadata
import logging
import sys
import warnings
from typing import Any, Callable, Optional

#: verl releases whose compute_advantage this module knows to wrap (0.9.0's is identical to 0.9.1's)
RECOGNISED_VERSIONS = ("0.9.0", "0.9.1")
#: where verl binds compute_advantage at module level (patched on import)
COMPUTE_ADVANTAGE_MODULES = (
    "verl.trainer.ppo.ray_trainer",
    "verl.trainer.ppo.v1.utils",
    "verl.experimental.separation.ray_trainer",
)
VALIDATE_MODULE = "verl.utils.config"

logger = logging.getLogger(__name__)
_CURRENT: contextvars.ContextVar = contextvars.ContextVar("lens_verl_batch", default=None)
_STATE: dict = {"version": None, "recognised": None, "names": frozenset(), "check": None, "targets": {}}


def current_batch() -> Any:
    """The ``DataProto`` that a wrapped ``compute_advantage`` is handling (``None`` outside one)."""
    return _CURRENT.get()


def verl_version() -> Optional[str]:
    """The version of the imported (or installed) verl, ``None`` if unknown."""
    version = getattr(sys.modules.get("verl"), "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version("verl")
        except importlib.metadata.PackageNotFoundError:
            return None
    return str(version)


def is_recognised() -> bool:
    """Whether the compute_advantage wrapper is active for this verl."""
    return bool(_STATE["recognised"])


def missing_old_log_probs_message(estimator: str) -> str:
    """The error for an estimator call that got no ``old_log_probs`` from anywhere."""
    version = _STATE["version"] or verl_version()
    if not _STATE["recognised"]:
        return (
            f"adv_estimator={estimator}: verl {version} is not a release lens-kernels recognises "
            f"({', '.join(RECOGNISED_VERSIONS)}), and it did not pass old_log_probs= or batch= to the estimator; "
            "refusing to compute LENS without the sampling policy's confidences. Use a recognised verl "
            "(pip install 'lens-kernels[verl]') or a verl that passes the batch to advantage estimators."
        )
    return (
        f"adv_estimator={estimator}: old_log_probs: LENS needs the sampling policy's per-token log-probs. Call "
        "it through verl's compute_advantage on a DataProto holding batch['old_log_probs'], or pass "
        "old_log_probs= (or batch=) to the estimator."
    )


def _name(estimator: Any) -> Any:
    return getattr(estimator, "value", estimator)


def _wrap_compute_advantage(original: Callable) -> Callable:
    @functools.wraps(original)
    def compute_advantage(data, *args, **kwargs):
        estimator = _name(kwargs["adv_estimator"] if "adv_estimator" in kwargs else (args[0] if args else None))
        if estimator not in _STATE["names"]:
            return original(data, *args, **kwargs)
        token = _CURRENT.set(data)
        try:
            return original(data, *args, **kwargs)
        finally:
            _CURRENT.reset(token)

    compute_advantage._lens_wrapped = True
    return compute_advantage


def _wrap_validate_config(original: Callable) -> Callable:
    @functools.wraps(original)
    def validate_config(config, *args, **kwargs):
        algorithm = config.get("algorithm") if hasattr(config, "get") else getattr(config, "algorithm", None)
        if algorithm is not None and _STATE["check"] is not None:
            _STATE["check"](algorithm)
        return original(config, *args, **kwargs)

    validate_config._lens_wrapped = True
    return validate_config


def _patch(module: Any) -> None:
    attr, make = _STATE["targets"].get(module.__name__, (None, None))
    fn = getattr(module, attr, None) if attr else None
    if fn is not None and not getattr(fn, "_lens_wrapped", False):
        setattr(module, attr, make(fn))


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then patches the fresh module."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _patch(module)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, resource readers, ...
        return getattr(self._loader, name)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds target modules with the other finders and wraps their loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _STATE["targets"]:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader)
        return spec


def install(names: set, check_filter_groups: Callable[[Any], None], patches: Optional[dict] = None) -> None:
    """Wrap verl's functions for the estimators ``names`` (idempotent).

    ``check_filter_groups(algorithm_config)`` raises when filter_groups is on with LENS.
    ``patches`` (``{module: (attribute, wrapper)}``, e.g. the fused forward's) are applied too,
    on a recognised verl only.
    """
    version = verl_version()
    recognised = version in RECOGNISED_VERSIONS
    first = _STATE["version"] is None
    _STATE.update(version=version, recognised=recognised, names=frozenset(names), check=check_filter_groups)
    targets = {VALIDATE_MODULE: ("validate_config", _wrap_validate_config)}
    if recognised:
        targets.update({m: ("compute_advantage", _wrap_compute_advantage) for m in COMPUTE_ADVANTAGE_MODULES})
        targets.update(patches or {})
    elif first:
        message = (
            f"lens-kernels: verl {version} is not a release this plugin recognises ({', '.join(RECOGNISED_VERSIONS)}). "
            "It will NOT wrap verl's compute_advantage to pass old_log_probs to the LENS advantage estimators "
            f"({', '.join(sorted(names))}); they will refuse to run unless this verl passes old_log_probs= or "
            "batch= to advantage estimators itself. Nor does it add fused_kernel_options.impl_backend=lens: "
            "verl's own fused backends are left as they are. Install a tested verl: pip install 'lens-kernels[verl]'."
        )
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        logger.warning(message)
    _STATE["targets"] = targets
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
    for module_name in targets:
        if module_name in sys.modules:
            _patch(sys.modules[module_name])
