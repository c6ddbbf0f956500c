"""Rollouts: grouping, completion masks, the sampler's log-probs against a fresh forward pass,
the tiny tokenizer/model, and the vLLM adapter (skipped where vLLM or a GPU is missing)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from lens_kernels.train.policy import Policy  # noqa: E402
from lens_kernels.train.rollout import (  # noqa: E402
    completion_mask, hf_generate, rollout_from_lists,
)
from lens_kernels.train.toy import BOXED_TOKEN, build_toy_model, build_toy_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def policy():
    tok = build_toy_tokenizer()
    return Policy.wrap(build_toy_model(tok, 32, 1, 2, seed=0), tok, "cpu")


def test_toy_tokenizer_round_trips_and_saves(tmp_path):
    from transformers import AutoTokenizer

    tok = build_toy_tokenizer()
    text = "12*7=\\boxed{84}"
    ids = tok(text).input_ids
    assert tok.convert_ids_to_tokens(ids)[5] == BOXED_TOKEN and len(ids) == 9
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text).input_ids == ids and again.eos_token_id == tok.eos_token_id


def test_toy_model_is_seeded():
    tok = build_toy_tokenizer()
    a, b, c = (build_toy_model(tok, 32, 1, 2, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_completion_mask_stops_after_first_eos():
    comp = torch.tensor([[5, 6, 1, 0, 0], [5, 1, 7, 1, 0], [5, 6, 7, 8, 9]])
    assert completion_mask(comp, [1]).int().tolist() == [
        [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1],
    ]
    assert completion_mask(comp, [1, 7])[2].int().tolist() == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_a_fresh_forward_pass(policy, temperature):
    import lens_kernels as lk

    tok = policy.tokenizer
    prompts = [tok(p).input_ids for p in ["3+4=", "12-5=", "7*13="]]  # unequal lengths
    torch.manual_seed(1)
    r = hf_generate(policy.model, tok, prompts, 4, temperature, 1.0, 6)
    assert r.sequences.shape[0] == 12 and len(r.texts) == 12
    assert torch.equal(r.sequences[:4, : r.prompt_len], r.sequences[:1, : r.prompt_len].expand(4, -1))
    rows = torch.arange(12)
    fresh = lk.token_logprobs(policy.completion_logits(r, rows), r.completion_ids, temperature)
    torch.testing.assert_close(r.sampler_logprobs[r.completion_mask], fresh[r.completion_mask],
                               rtol=1e-5, atol=1e-5)
    assert torch.all(r.sampler_logprobs[~r.completion_mask] == 0)
    torch.testing.assert_close(policy.logprobs(r, temperature), torch.where(
        r.completion_mask, fresh, torch.zeros_like(fresh)), rtol=1e-5, atol=1e-5)


def test_top_p_sampler_logprobs_are_those_of_the_truncated_distribution(policy):
    tok = policy.tokenizer
    torch.manual_seed(2)
    r = hf_generate(policy.model, tok, [tok("3+4=").input_ids], 32, 1.0, 0.3, 4)
    full = policy.logprobs(r, 1.0)
    m = r.completion_mask
    # renormalised over the nucleus: never below the full distribution's log-prob
    assert torch.all(r.sampler_logprobs[m] >= full[m] - 1e-5)
    assert torch.any(r.sampler_logprobs[m] > full[m] + 1e-3)


def test_generation_is_seeded_by_the_global_rng(policy):
    tok = policy.tokenizer
    prompts = [tok("1+1=").input_ids]
    torch.manual_seed(3)
    a = hf_generate(policy.model, tok, prompts, 8, 1.0, 1.0, 5)
    torch.manual_seed(3)
    b = hf_generate(policy.model, tok, prompts, 8, 1.0, 1.0, 5)
    assert torch.equal(a.sequences, b.sequences) and a.texts == b.texts


def test_rollout_from_lists(policy):
    tok = policy.tokenizer
    eos = tok.eos_token_id
    r = rollout_from_lists(tok, [[10, 11], [12]], 2,
                           [[20, eos], [21, 22, 23], [], [24, eos, 25]],
                           [[-0.1, -0.2], [-0.3, -0.4, -0.5], [], [-0.6, -0.7, -0.8]], [eos], "cpu")
    assert r.prompt_len == 2 and r.sequences.shape == (4, 5)
    assert r.completion_mask.int().tolist() == [[1, 1, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0]]
    assert r.attention_mask[:, :2].tolist() == [[1, 1], [1, 1], [0, 1], [0, 1]]
    assert r.sampler_logprobs[3].tolist() == pytest.approx([-0.6, -0.7, 0.0])
    with pytest.raises(ValueError, match="expected 4 completions"):
        rollout_from_lists(tok, [[10]], 4, [[1]], [[0.0]], [eos], "cpu")


@pytest.mark.gpu
def test_vllm_engine_samples_and_syncs_weights(policy, tmp_path):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM rollouts need a CUDA GPU")
    from lens_kernels.train.config import TrainConfig
    from lens_kernels.train.vllm_engine import VLLMEngine

    policy.model.save_pretrained(tmp_path)
    policy.tokenizer.save_pretrained(tmp_path)
    gpu = Policy.load(str(tmp_path), "cuda", bf16=False)
    engine = VLLMEngine(str(tmp_path), gpu, TrainConfig(seed=0, vllm_gpu_memory_utilization=0.2))
    prompts = [gpu.tokenizer("3+4=").input_ids]
    r = engine.generate(prompts, 8, 1.0, 1.0, 6, seed=0)
    fresh = gpu.logprobs(r, 1.0)
    torch.testing.assert_close(r.sampler_logprobs[r.completion_mask], fresh[r.completion_mask],
                               rtol=0, atol=0.05)  # vLLM computes in bf16
    with torch.no_grad():
        gpu.model.lm_head.weight.mul_(0).add_(torch.randn_like(gpu.model.lm_head.weight))
    engine.sync(gpu.model)
    r2 = engine.generate(prompts, 8, 1.0, 1.0, 6, seed=0)
    fresh2 = gpu.logprobs(r2, 1.0)
    torch.testing.assert_close(r2.sampler_logprobs[r2.completion_mask],
                               fresh2[r2.completion_mask], rtol=0, atol=0.05)
    engine.close()
