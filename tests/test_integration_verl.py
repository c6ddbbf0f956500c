"""lens_kernels.integrations.verl through verl's own code (CPU).

Needs verl importable (its own virtual environment in CI: see .ci/run); skipped otherwise.
Runs verl's ``compute_advantage`` (legacy trainer) and ``compute_advantage_for_multi_trajectories``
(V1 trainer) on a ``DataProto`` and compares with ``lk.lens_advantages``; fresh processes check
the ``verl.plugins`` entry point, ``VERL_USE_EXTERNAL_PLUGINS=none`` and the refusal on an
unrecognised verl.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import lens_kernels as lk
from tests.tolerances import check


def _import_verl():
    """Import verl and the trainer modules quietly (their import-time warnings are not ours)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import verl  # noqa: F401  (loads the plugin through the entry point)
            from verl.trainer.ppo import ray_trainer
            from verl.trainer.ppo.v1 import utils as v1_utils
        except Exception as exc:  # ImportError, or a missing dependency of verl's trainer
            pytest.skip(f"verl is not importable here ({type(exc).__name__}: {exc}); "
                        "run it in the environment scripts/verl_test_env.sh makes", allow_module_level=True)
    return verl, ray_trainer, v1_utils


verl, ray_trainer, v1_utils = _import_verl()
from omegaconf import OmegaConf  # noqa: E402  (a verl dependency)

from lens_kernels.integrations import verl as lens_verl  # noqa: E402

GROUPS = {"mixed": [1, 0, 0, 1], "all_wrong": [0, 0, 0, 0], "all_correct": [1, 1, 1, 1], "mixed_2": [0, 1, 0, 0]}
ESTIMATOR_MODES = {"lens": "lens", "lens-mixed-only": "lens-mixed-only", "lens-negative-only": "lens-negative-only"}


def make_batch(seed: int = 0, response_len: int = 7):
    """A verl ``DataProto`` with shuffled groups (uids), ragged responses, outcome rewards on the
    last response token, and sampler log-probs; plus the inputs of ``lk.lens_advantages``."""
    gen = torch.Generator().manual_seed(seed)
    uids = [f"prompt-{name}" for name, rewards in GROUPS.items() for _ in rewards]
    rewards = torch.tensor([r for rs in GROUPS.values() for r in rs], dtype=torch.float32)
    order = torch.randperm(len(uids), generator=gen)
    uids = [uids[i] for i in order]
    rewards = rewards[order]
    batch = len(uids)
    lengths = torch.randint(2, response_len + 1, (batch,), generator=gen)
    mask = (torch.arange(response_len)[None, :] < lengths[:, None]).to(torch.int64)
    old_log_probs = -torch.rand(batch, response_len, generator=gen) * 1.5
    token_level_rewards = torch.zeros(batch, response_len)
    token_level_rewards[torch.arange(batch), lengths - 1] = rewards
    import numpy as np

    data = verl.DataProto.from_dict(
        tensors={"token_level_rewards": token_level_rewards, "response_mask": mask, "old_log_probs": old_log_probs},
        non_tensors={"uid": np.array(uids, dtype=object)},
    )
    names = sorted(set(uids))
    group_index = torch.tensor([names.index(u) for u in uids])
    return data, dict(old_logprobs=old_log_probs, completion_mask=mask, rewards=rewards, group_index=group_index)


def algorithm_config(**lens):
    config = {"adv_estimator": "lens", "gamma": 1.0, "lam": 1.0, "norm_adv_by_std_in_grpo": True,
              "filter_groups": {"enable": False}}
    if lens:
        config["lens"] = lens
    return OmegaConf.create(config)


def per_response(data) -> torch.Tensor:
    """verl's [B, T] advantages -> one value per response (checked constant over its tokens)."""
    adv, mask = data.batch["advantages"], data.batch["response_mask"].bool()
    first = adv[:, 0]
    assert torch.equal(adv, first[:, None] * mask), "advantage not constant over a response's tokens"
    return first


def run_script(code: str, **env) -> dict:
    """Run ``code`` in a fresh interpreter (this one's), return the JSON it prints last."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **env}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=300)
    assert proc.returncode == 0, f"fresh process failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


FRESH_IMPORT = """
    import json, verl
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY
    print(json.dumps(sorted(k for k in ADV_ESTIMATOR_REGISTRY if k.startswith("lens"))))
"""


def test_plugin_loads_through_entry_point_in_fresh_process():
    assert run_script(FRESH_IMPORT) == ["lens", "lens-mixed-only", "lens-negative-only"]


def test_external_plugins_none_disables_plugin():
    assert run_script(FRESH_IMPORT, VERL_USE_EXTERNAL_PLUGINS="none") == []


def test_plugin_wraps_compute_advantage_where_verl_binds_it():
    from verl.models.transformers import monkey_patch
    from verl.utils.experimental import torch_functional

    assert verl.__version__ in lens_verl._verl_compat.RECOGNISED_VERSIONS
    assert lens_verl._verl_compat.is_recognised()
    for fn in (ray_trainer.compute_advantage, v1_utils.compute_advantage, monkey_patch.patch_forward_with_backends,
               torch_functional.FusedLinearForPPO):
        assert getattr(fn, "_lens_wrapped", False), fn


@pytest.mark.parametrize("estimator", list(ESTIMATOR_MODES))
@pytest.mark.parametrize("seed", [0, 1], ids=lambda s: f"seed{s}")
def test_legacy_compute_advantage_equals_lens_advantages(estimator, seed):
    data, inputs = make_batch(seed)
    out = ray_trainer.compute_advantage(data, adv_estimator=estimator, config=algorithm_config(alpha=0.5))
    expected = lk.lens_advantages(**inputs, mode=ESTIMATOR_MODES[estimator], alpha=0.5).advantages
    torch.testing.assert_close(per_response(out), expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(out.batch["returns"], out.batch["advantages"])


@pytest.mark.parametrize("estimator", list(ESTIMATOR_MODES))
def test_v1_compute_advantage_equals_lens_advantages(estimator):
    data, inputs = make_batch(seed=2)
    keys = [f"{uid}_0_{i}" for i, uid in enumerate(data.non_tensor_batch["uid"])]
    out = v1_utils.compute_advantage_for_multi_trajectories(
        data, batch_keys=keys, adv_estimator=estimator, num_repeat=4,
        norm_adv_by_std_in_grpo=True, config=algorithm_config(alpha=0.5),
    )
    expected = lk.lens_advantages(**inputs, mode=ESTIMATOR_MODES[estimator], alpha=0.5).advantages
    torch.testing.assert_close(per_response(out), expected, rtol=1e-6, atol=1e-7)


def test_options_are_read_from_algorithm_lens():
    data, inputs = make_batch(seed=3)
    config = algorithm_config(alpha=1.0, scale_by_std=False, std_eps=1e-3, length_gamma=0.9)
    out = ray_trainer.compute_advantage(data, adv_estimator="lens", config=config)
    expected = lk.lens_advantages(**inputs, alpha=1.0, scale_by_std=False, std_eps=1e-3, length_gamma=0.9)
    torch.testing.assert_close(per_response(out), expected.advantages, rtol=1e-6, atol=1e-7)
    default = lk.lens_advantages(**inputs).advantages
    assert not torch.allclose(expected.advantages, default), "the options changed nothing: the test cannot fail"


def test_all_wrong_groups_nonzero_under_lens_zero_under_verl_grpo():
    data, inputs = make_batch(seed=4)
    all_wrong = torch.tensor([u == "prompt-all_wrong" for u in data.non_tensor_batch["uid"]])
    grpo = per_response(ray_trainer.compute_advantage(data, adv_estimator="grpo", config=algorithm_config()))
    data, _ = make_batch(seed=4)
    lens = per_response(ray_trainer.compute_advantage(data, adv_estimator="lens", config=algorithm_config()))
    assert torch.equal(grpo[all_wrong], torch.zeros(4))
    assert (lens[all_wrong].abs() > 1e-4).all(), lens[all_wrong]
    assert lens[all_wrong].sum().abs() < 1e-5  # de-meaned within the group


def test_estimator_accepts_old_log_probs_and_batch_directly():
    """What a verl that passes the batch to estimators (verl PR #7473) would do."""
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    data, inputs = make_batch(seed=5)
    fn = get_adv_estimator_fn("lens")
    kwargs = dict(token_level_rewards=data.batch["token_level_rewards"], response_mask=data.batch["response_mask"],
                  config=algorithm_config(), index=data.non_tensor_batch["uid"])
    expected = lk.lens_advantages(**inputs).advantages
    by_batch, _ = fn(**kwargs, batch=data.batch, non_tensor_batch=data.non_tensor_batch)
    by_tensor, _ = fn(**kwargs, old_log_probs=data.batch["old_log_probs"])
    torch.testing.assert_close(by_batch[:, 0], expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(by_tensor[:, 0], expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="old_log_probs"):
        fn(**kwargs)  # called outside compute_advantage with nothing to read confidences from


def test_filter_groups_with_lens_raises():
    data, _ = make_batch(seed=6)
    config = algorithm_config()
    config.filter_groups.enable = True
    with pytest.raises(ValueError, match="algorithm.filter_groups.enable"):
        ray_trainer.compute_advantage(data, adv_estimator="lens", config=config)


def verl_trainer_config(*overrides: str):
    """verl's own ppo_trainer config composed with Hydra, as ``python -m verl.trainer.main_ppo`` does."""
    from hydra import compose, initialize_config_dir
    from verl.trainer import config as config_package

    config_dir = os.path.dirname(config_package.__file__)
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose("ppo_trainer", overrides=list(overrides))


def test_hydra_command_line_options_reach_verl():
    config = verl_trainer_config("algorithm.adv_estimator=lens", "+algorithm.lens.alpha=0.5",
                                 "+algorithm.lens.length_gamma=0.9", "actor_rollout_ref.model.use_fused_kernels=True",
                                 "actor_rollout_ref.model.fused_kernel_options.impl_backend=lens")
    options = lens_verl.lens_options(config.algorithm)
    assert (options["alpha"], options["length_gamma"], options["mode"]) == (0.5, 0.9, "lens")
    model = config.actor_rollout_ref.model  # what the FSDP engine reads to patch the actor and the reference
    assert model.use_fused_kernels and model.fused_kernel_options.impl_backend == "lens"


def test_filter_groups_with_lens_fails_at_start_up():
    """verl's validate_config (called by main_ppo before any rollout) refuses the combination."""
    from verl.utils import config as verl_config

    config = verl_trainer_config("algorithm.adv_estimator=lens", "algorithm.filter_groups.enable=True")
    with pytest.raises(ValueError, match="algorithm.filter_groups.enable=True cannot be used"):
        verl_config.validate_config(config, use_reference_policy=False, use_critic=False)


@pytest.mark.parametrize("lens, message", [
    ({"alpah": 0.5}, r"algorithm\.lens\.alpah: unknown LENS option"),
    ({"mode": "grpo"}, r"algorithm\.lens\.mode='grpo' conflicts with algorithm\.adv_estimator=lens-mixed-only"),
], ids=["misspelt-key", "mode-conflicts-with-estimator"])
def test_bad_lens_options_name_the_key(lens, message):
    data, _ = make_batch(seed=7)
    with pytest.raises(ValueError, match=message):
        ray_trainer.compute_advantage(data, adv_estimator="lens-mixed-only", config=algorithm_config(**lens))


def test_rewards_outside_unit_interval_are_refused():
    data, _ = make_batch(seed=8)
    data.batch["token_level_rewards"] = data.batch["token_level_rewards"] * 2 - 1  # a -1/+1 reward
    with pytest.raises(ValueError, match=r"token_level_rewards: LENS needs .* in \[0, 1\]"):
        ray_trainer.compute_advantage(data, adv_estimator="lens", config=algorithm_config())


def test_unrecognised_verl_warns_and_refuses():
    report = run_script("""
        import json, warnings
        import verl
        from verl.trainer.ppo import ray_trainer
        verl.__version__ = "0.99.0"  # a release the plugin has never seen
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from lens_kernels.integrations import verl as lens_verl
        sys_path_loaded = "lens" in __import__("verl.trainer.ppo.core_algos", fromlist=["x"]).ADV_ESTIMATOR_REGISTRY
        import numpy as np, torch
        data = verl.DataProto.from_dict(
            tensors={"token_level_rewards": torch.tensor([[0.0, 1.0], [0.0, 0.0]]),
                     "response_mask": torch.ones(2, 2, dtype=torch.int64),
                     "old_log_probs": torch.full((2, 2), -0.5)},
            non_tensors={"uid": np.array(["a", "a"], dtype=object)})
        try:
            ray_trainer.compute_advantage(data, adv_estimator="lens")
            error = ""
        except RuntimeError as exc:
            error = str(exc)
        from verl.models.transformers import monkey_patch
        from verl.utils.experimental import torch_functional
        try:
            torch_functional.FusedLinearForPPO(impl_backend="lens")
            fused_error = ""
        except ValueError as exc:
            fused_error = str(exc)
        wrapped = [getattr(f, "_lens_wrapped", False) for f in (ray_trainer.compute_advantage,
                   monkey_patch.patch_forward_with_backends, torch_functional.FusedLinearForPPO)]
        print(json.dumps({"warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
                          "registered": sys_path_loaded, "wrapped": wrapped, "error": error,
                          "fused_error": fused_error}))
    """, VERL_USE_EXTERNAL_PLUGINS="none")
    assert report["registered"] and report["wrapped"] == [False, False, False], report
    assert any("verl 0.99.0 is not a release this plugin recognises" in w and "impl_backend=lens" in w
               for w in report["warnings"]), report
    assert "refusing to compute LENS without the sampling policy's confidences" in report["error"], report
    assert "Unsupported FusedLinearForPPO backend: lens" in report["fused_error"], report  # verl's own check


# --- impl_backend=lens: verl's fused actor/reference forward ------------------------------------

VOCAB = 1000  # not a multiple of any block size
LENGTHS = [5, 11, 2, 8]  # ragged sequences (prompt + response), as verl's nested micro-batches hold them


def tiny_model(kind: str):
    """A random 2-layer Qwen2 (untied lm_head) or Llama (lm_head tied to the embedding), fp32, sdpa."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls, tied = {"qwen2": (Qwen2Config, Qwen2ForCausalLM, False),
                                   "llama": (LlamaConfig, LlamaForCausalLM, True)}[kind]
    config = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        tie_word_embeddings=tied, attn_implementation="sdpa")
    torch.manual_seed(1)
    return model_cls(config).float()


def engine_micro_batch(remove_padding: bool, temperature: float):
    """The TensorDict that verl's FSDP engine hands to ``forward_step``: nested (jagged) input and
    position ids plus the flags its workers assign."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    gen = torch.Generator().manual_seed(2)
    ids = [torch.randint(0, VOCAB, (n,), generator=gen) for n in LENGTHS]
    batch = TensorDict({"input_ids": torch.nested.as_nested_tensor(ids, layout=torch.jagged),
                        "position_ids": torch.nested.as_nested_tensor([torch.arange(n) for n in LENGTHS],
                                                                       layout=torch.jagged)},
                       batch_size=[len(ids)])
    tu.assign_non_tensor(batch, temperature=temperature, use_remove_padding=remove_padding, use_fused_kernels=True,
                         calculate_entropy=True)
    return batch


def engine_forward(model, micro_batch):
    """verl's ``FSDPEngineWithLMHead.forward_step`` on the CPU, without FSDP and autocast: its own
    ``prepare_model_inputs`` (packing or padding), the patched model forward, its own
    ``prepare_model_outputs`` (unpadding) -> packed ``(log_probs [N], entropy [N])``."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    engine = object.__new__(FSDPEngineWithLMHead)  # no process group: only the attributes these methods read
    engine.pad_to_length, engine.use_ulysses_sp = False, False
    inputs, output_args = engine.prepare_model_inputs(micro_batch)
    output = model(**inputs, use_cache=False)
    result = engine.prepare_model_outputs(output, output_args, micro_batch, None)
    return result["log_probs"].values(), result["entropy"].values()


@pytest.mark.parametrize("kind, remove_padding, temperature", [
    ("qwen2", True, 0.7), ("qwen2", False, 1.0), ("llama", True, 1.3),
], ids=["qwen2-remove-padding-t0.7", "qwen2-padded-t1", "llama-tied-remove-padding-t1.3"])
def test_lens_fused_forward_equals_verl_torch_backend(kind, remove_padding, temperature):
    """Log-probs, entropy and the gradient of every parameter of a loss using both (verl's
    entropy_coeff) equal verl's impl_backend=torch, through verl's own patched forward."""
    from verl.models.transformers.monkey_patch import apply_monkey_patch

    base = tiny_model(kind)
    results = {}
    for backend in ("torch", "lens"):
        model = copy.deepcopy(base)
        apply_monkey_patch(model, use_remove_padding=remove_padding, use_fused_kernels=True,
                           fused_kernels_backend=backend)
        assert model._verl_fused_kernels_backend == backend
        logp, entropy = engine_forward(model, engine_micro_batch(remove_padding, temperature))
        weights = torch.rand(2, logp.numel(), generator=torch.Generator().manual_seed(3))
        ((weights[0] * logp).sum() - 0.1 * (weights[1] * entropy).sum()).backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        with torch.no_grad():  # the reference / old-log-prob forward
            no_grad = engine_forward(model, engine_micro_batch(remove_padding, temperature))
        results[backend] = logp.detach(), entropy.detach(), grads, no_grad
    logp, entropy, grads, no_grad = results["lens"]
    gold_logp, gold_entropy, gold_grads, _ = results["torch"]
    assert logp.shape == (sum(LENGTHS),) and logp.dtype == entropy.dtype == torch.float32
    assert (entropy > 1.0).all() and (logp < -1.0).all()  # a near-uniform random model: nothing trivially 0
    check("log_probs", logp, gold_logp, None, torch.float32)
    check("entropy", entropy, gold_entropy, None, torch.float32)
    check("no-grad log_probs", no_grad[0], gold_logp, None, torch.float32)
    check("no-grad entropy", no_grad[1], gold_entropy, None, torch.float32)
    assert grads.keys() == gold_grads.keys()
    for name, grad in grads.items():
        assert grad is not None and gold_grads[name] is not None and gold_grads[name].abs().max() > 0, name
        check(f"grad {name}", grad, gold_grads[name], None, torch.float32)


def test_lens_fused_call_under_autocast_casts_like_verl_matmul():
    """verl's engine runs the forward under autocast: fp32 hidden states and weight go in as the
    autocast dtype (as autocast casts verl's own ``hidden @ W.T``), fp32 gradients come back."""
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    hidden = torch.randn(3, 7, 16, requires_grad=True)
    weight = torch.randn(VOCAB, 16, dtype=torch.bfloat16).float().requires_grad_()
    ids = torch.randint(0, VOCAB, (3, 7), dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, entropy = FusedLinearForPPO(impl_backend="lens")(hidden, weight, ids, temperature=0.9)
    expected = lk.fused_linear_token_logprobs(hidden.detach().bfloat16(), weight.detach().bfloat16(), ids.long(),
                                              temperature=0.9, return_entropy=True)
    assert torch.equal(logp, expected[0]) and torch.equal(entropy, expected[1])
    (logp.sum() + entropy.sum()).backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32 and hidden.grad.abs().max() > 0
    with pytest.raises(ValueError, match="Unsupported FusedLinearForPPO backend: bogus"):
        FusedLinearForPPO(impl_backend="bogus")  # verl's own check still runs for names that are not ours


def test_lens_backend_refused_on_verl_0_9_0():
    """verl 0.9.0 builds ``FusedLinearForPPO()`` with no backend: impl_backend=lens is refused by
    name when the model is patched; verl's own backends pass through."""
    from lens_kernels.integrations import verl_fused

    (attr, wrap), = verl_fused.patches_for("0.9.0").values()
    calls = []
    patched = wrap(lambda model, use_fused_kernels=False, fused_kernels_backend=None: calls.append(fused_kernels_backend))
    with pytest.raises(ValueError, match=r"fused_kernel_options\.impl_backend=lens: needs verl 0\.9\.1"):
        patched(object(), use_fused_kernels=True, fused_kernels_backend="lens")
    patched(object(), use_fused_kernels=True, fused_kernels_backend="torch")
    assert attr == "patch_forward_with_backends" and calls == ["torch"]
