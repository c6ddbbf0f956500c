"""Smoke tests of the benchmark package on tiny CPU shapes (no timing assertions).

The float64 gate is checked against ``lk.reference`` plus autograd, the memory measurement
against allocations of known size, and the CLI and ``python -m lens_kernels`` end to end
(JSON, markdown, PNG into ``tmp_path``).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import lens_kernels as lk
from lens_kernels.backends import torch_backend
from lens_kernels.bench import check, cli, registry, runner, summary, targets
from lens_kernels.bench.floors import floor_bytes, floors
from lens_kernels.bench.measure import Timer, peak_bytes
from lens_kernels.bench.problems import CLIP_MARGIN, make_inputs, off_policy_logprobs, shape_for_tokens

CPU = torch.device("cpu")
TINY = ["--device", "cpu", "--vocab", "1000", "--tokens", "64", "--group-size", "4", "--rows", "8",
        "--warmup", "1", "--min-runs", "2", "--max-runs", "2", "--budget", "0.01", "--copies", "2"]


def tiny_inputs(vocab=1000, dtype=torch.float32, seed=0):
    return make_inputs(shape_for_tokens(64, vocab, dtype, group_size=4, rows=8), CPU, seed)


def reference_loss_and_grad(inputs, mode):
    """The plain float64 reference and autograd, on a float64 copy of the logits."""
    logits = inputs.logits.detach().double().requires_grad_(True)
    out = lk.reference.fused_lens_loss(**inputs.loss_kwargs(logits), mode=mode)
    (grad,) = torch.autograd.grad(out.loss, logits)
    return out.loss.detach(), grad


def test_inputs_share_storage_in_trainer_layout():
    x = tiny_inputs()
    assert x.full.shape == (8, 9, 1000) and x.logits.shape == (8, 8, 1000)
    assert x.logits.data_ptr() == x.full.data_ptr() and not x.logits.is_contiguous()
    assert x.logits.is_leaf and x.full.is_leaf and x.logits.requires_grad
    assert torch.equal(x.full.detach()[:, :-1], x.logits.detach())
    copy = x.copy()
    assert copy.full.data_ptr() != x.full.data_ptr() and torch.equal(copy.full, x.full)
    assert x.completion_mask.any(-1).all(), "every row has a completion token (Liger's mean equals the SPEC's)"


@pytest.mark.parametrize("mode", ["lens", "grpo"])
def test_gold_equals_reference_autograd(monkeypatch, mode):
    monkeypatch.setattr(check, "CHUNK_BYTES", 3 * 32 * 1000)  # 3 positions per chunk: many chunks
    x = tiny_inputs()
    gold = check.gold(x, mode, check.gold_logprobs(x))
    loss, grad = reference_loss_and_grad(x, mode)
    assert gold.loss == pytest.approx(float(loss), abs=1e-14)
    result = check.compare(loss, grad, x, gold)
    assert result.passed and result.grad_error <= 1e-15 * result.grad_scale and result.grad_scale > 0


def test_check_fails_a_wrong_gradient():
    x = tiny_inputs()
    gold = check.gold(x, "lens", check.gold_logprobs(x))
    loss, grad = reference_loss_and_grad(x, "lens")
    assert not check.compare(loss, grad * 1.01, x, gold).passed
    assert not check.compare(loss + 1e-2, grad, x, gold).passed
    bad = grad.clone()
    bad[0, 3, 7] = math.nan
    assert not check.compare(loss, bad, x, gold).passed


def test_wrong_implementation_is_not_timed():
    eager = registry.REGISTRY["reference-eager"]
    wrong = replace(eager, name="wrong", build=lambda mode: (lambda x: 1.01 * eager.build(mode)(x)))
    x = tiny_inputs()
    settings = runner.Settings(Timer(CPU, warmup=1, min_runs=2, max_runs=2, budget_s=0.01), bandwidth=1e10)
    gold = check.gold(x, "lens", check.gold_logprobs(x))
    record = runner.measure(wrong, "lens", [x], gold, settings)
    assert record["status"] == "failed-check" and "fwd_median_ms" not in record
    record = runner.measure(eager, "lens", [x, x.copy()], gold, settings)
    assert record["status"] == "ok" and record["fwdbwd_runs"] == 2 and record["grad_relative_error"] < 1e-5


def test_cpu_peak_memory_counts_allocations(monkeypatch):
    assert peak_bytes(lambda _: torch.ones(1_000_000), None, CPU) == 4_000_000
    x = tiny_inputs(vocab=4000)
    numel = x.logits.numel()
    fp64 = peak_bytes(lambda x: lk.reference.fused_lens_loss(**x.loss_kwargs()).loss, x, CPU)
    assert fp64 >= 2 * 8 * numel, "the float64 copy and the float64 log_softmax must both show"
    monkeypatch.setattr(torch_backend, "CHUNK_BYTES", 12 * 4000 * 8)  # 8 positions per chunk
    fused = registry.REGISTRY["fused-torch"]
    extra = peak_bytes(runner.forward_backward(fused, fused.build("lens")), x, CPU)
    assert 4 * numel <= extra < 2 * 4 * numel, "the fp32 gradient plus a few chunk-sized temporaries"


def test_registry_states_what_each_computes_and_why_not():
    names = set(registry.REGISTRY)
    assert {"fused-triton", "fused-cuda", "fused-torch", "reference-eager", "reference-compiled", "liger-grpo",
            "liger-lens"} <= names
    for impl in registry.REGISTRY.values():
        assert len(impl.computes) > 60
    for name, mode, other in (("liger-grpo", "grpo", "lens"), ("liger-lens", "lens", "grpo")):
        liger = registry.REGISTRY[name]
        assert "only mode" in liger.skip_reason(CPU, other)
        assert "CUDA" in liger.skip_reason(CPU, mode) or "not installed" in liger.skip_reason(CPU, mode)
    assert "CUDA" in registry.REGISTRY["fused-triton"].skip_reason(CPU, "lens"), "never timed on the interpreter"
    assert registry.REGISTRY["fused-torch"].skip_reason(CPU, "lens") is None
    assert [i.name for i in registry.select(["fused", "reference-eager"], CPU)] == ["fused-torch", "reference-eager"]
    with pytest.raises(ValueError, match="unknown implementation"):
        registry.select(["nope"], CPU)


def test_cli_writes_json_markdown_and_plot(tmp_path, capsys):
    argv = TINY + ["--modes", "lens,grpo", "--impl", "fused-torch,reference-eager,liger-grpo",
                   "--out", str(tmp_path), "--name", "smoke", "--save"]
    assert cli.main(argv) == 0
    payload = json.loads((tmp_path / "smoke.json").read_text())
    assert payload["environment"]["command"] == "lens-bench " + " ".join(argv)
    assert payload["environment"]["torch"] == torch.__version__ and payload["environment"]["copy_bandwidth_gbps"] > 0
    by_key = {(r["impl"], r["mode"], r["policy"]): r for r in payload["results"]}
    assert len(by_key) == 12 and "partial" not in payload
    for impl in ("fused-torch", "reference-eager"):
        for mode in ("lens", "grpo"):
            for policy in ("on", "off"):
                r = by_key[impl, mode, policy]
                assert r["status"] == "ok" and r["check_passed"] and r["grad_relative_error"] < 1e-5
                assert r["fwd_median_ms"] > 0 and r["fwdbwd_median_ms"] > 0
                assert r["host_fwdbwd_median_ms"] == r["fwdbwd_median_ms"], "the CPU has nothing asynchronous"
                assert r["x_floor_2pass"] > 0 and r["x_floor_1pass"] > r["x_floor_2pass"]
                assert r["peak_extra_mb"] >= r["grad_mb"] > 0
                assert (r["clip_fraction"] > 0) == (policy == "off")
    for mode in ("lens", "grpo"):
        assert by_key["liger-grpo", mode, "on"]["status"] == "skipped" and by_key["liger-grpo", mode, "on"]["reason"]
    md = (tmp_path / "smoke.md").read_text()
    assert "| shape | policy | mode | impl | fwd ms |" in md and "**liger-grpo**:" in md and "Copy bandwidth" in md
    compact = summary.summarize([tmp_path / "smoke.json"])
    assert "floor 1p/2p" in compact and "torch" in compact and "eager" in compact and "lens-bench" in compact
    pytest.importorskip("matplotlib")
    assert (tmp_path / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fused-torch" in capsys.readouterr().out


def test_every_option_has_readable_help():
    for default in ("quick", "sweep"):
        actions = {a.dest: a for a in cli.parser("lens-bench", default)._actions}
        for dest, action in actions.items():
            assert action.help and "[" not in action.help, (dest, action.help)
        assert f"{default} (default):" in actions["preset"].help and "issue" not in actions["preset"].help
    assert actions["modes"].help.endswith(": lens, grpo")
    assert "fp32, bf16, fp16" in actions["dtype"].help and "fused-torch, reference-eager" in actions["impl"].help


def test_python_m_lens_kernels_prints_no_profiler_lines(tmp_path):
    """The CPU memory measurement runs torch's profiler, whose kineto logs USDT lines at start
    and stop unless KINETO_LOG_LEVEL is above them (read once per process: a subprocess)."""
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(lk.__file__)),
                                         env.get("PYTHONPATH", "")])  # this lens_kernels
    argv = TINY + ["--impl", "fused-torch", "--modes", "lens"]
    done = subprocess.run([sys.executable, "-m", "lens_kernels", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "fused-torch" in done.stdout and "no files written" in done.stdout
    assert "profiler_st" not in done.stderr + done.stdout, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_targets_report_met_missed_and_not_measured():
    base = dict(mode="lens", policy="on", dtype="fp32", vocab=32000, tokens=4096, status="ok")
    fused = dict(base, impl="fused-torch", fwdbwd_median_ms=90.0, peak_extra_mb=100.0, peak_extra_minus_grad_mb=5.0)
    eager = dict(base, impl="reference-eager", fwdbwd_median_ms=100.0, peak_extra_mb=500.0,
                 peak_extra_minus_grad_mb=400.0)
    verdicts = [t["verdict"] for t in targets.evaluate([fused, eager], "cpu")]
    assert verdicts == ["missed by 100% (1 of 2 cases measured)", "met (1 of 2 cases measured)",
                        "met (1 of 2 cases measured)"]
    off = [dict(r, policy="off", fwdbwd_median_ms=r["fwdbwd_median_ms"] * k) for r, k in ((fused, 1.2), (eager, 1))]
    worst = targets.evaluate([fused, eager, *off], "cpu")[2]
    assert worst["verdict"] == "missed by 8%" and worst["worst_at"] == "V=32000 N=4096 fp32 off-policy lens"
    verdicts = targets.evaluate([fused, dict(eager, status="oom")], "cpu")
    assert all(t["verdict"] == "not measured (fused-torch, reference-eager)" for t in verdicts), "off: no runs"
    assert targets.evaluate([dict(fused, tokens=512)], "cpu") == []


def test_gpu_targets_compare_with_liger_in_each_mode_over_the_sweep():
    def rec(impl, mode, policy, ms, vocab=151936, tokens=16384):
        return dict(impl=impl, mode=mode, policy=policy, dtype="bf16", vocab=vocab, tokens=tokens, status="ok",
                    fwdbwd_median_ms=ms, host_fwdbwd_median_ms=0.1, x_floor_1pass=1.1, x_floor_2pass=1.0,
                    peak_extra_minus_grad_mb=0.5)

    records = [rec("fused-triton", "grpo", "off", 2.0), rec("liger-grpo", "grpo", "off", 3.0),
               rec("fused-triton", "lens", "off", 2.0), rec("liger-lens", "lens", "off", 2.4),
               rec("fused-triton", "grpo", "on", 1.0, vocab=32000, tokens=4096),
               rec("liger-grpo", "grpo", "on", 0.9, vocab=32000, tokens=4096)]
    by_text = {t["target"]: t for t in targets.evaluate(records, "cuda")}
    speedup = by_text["triton: >= 1.3x faster than Liger (liger-grpo / liger-lens), off-policy"]
    assert speedup["value"] == pytest.approx(1.2) and speedup["worst_at"].endswith("off-policy lens")
    assert speedup["verdict"] == "missed by 8%"
    never = by_text["triton: never slower than Liger, every bf16 sweep shape, mode and policy"]
    assert never["value"] == pytest.approx(1 / 0.9) and never["measured"] == 3 and never["cases"] == 36
    assert by_text["cuda: >= 1.3x faster than Liger (liger-grpo / liger-lens), off-policy"]["verdict"] == (
        "not measured (fused-cuda)")


def test_floors_count_the_mask():
    x = tiny_inputs()
    live, rows, row_bytes = int(x.completion_mask.sum()), 64, 1000 * 4
    assert 0 < live < rows
    assert floor_bytes(x, 2) == (2 * live + rows) * row_bytes and floor_bytes(x, 1) == (live + rows) * row_bytes
    f = floors(x, bandwidth=1e9, fwdbwd_ms=2.0)
    assert f["floor_1pass_ms"] == pytest.approx((live + rows) * row_bytes / 1e6)
    assert f["x_floor_2pass"] == pytest.approx(2.0 / f["floor_2pass_ms"]) and f["mask_density"] == live / rows


def test_off_policy_inputs_clip_some_tokens_but_none_near_the_edges():
    x = tiny_inputs()
    logp = check.gold_logprobs(x)
    old = off_policy_logprobs(logp, x.completion_mask)
    live = x.completion_mask
    assert old.dtype == torch.float32 and torch.all(old[~live] == 0) and torch.all(old <= 0)
    log_ratio = (logp - old.double())[live]
    for edge in (math.log(0.8), math.log(1.2)):
        assert (log_ratio - edge).abs().min() >= CLIP_MARGIN * 0.99
    gold = check.gold(replace(x, old_logprobs=old), "lens", logp)
    assert 0.01 < gold.clip_fraction < 0.5


def test_time_limit_records_the_rest_as_skipped():
    settings = runner.Settings(Timer(CPU, warmup=1, min_runs=2, max_runs=2), bandwidth=1e10, deadline=0.0)
    shape = shape_for_tokens(64, 1000, torch.float32, group_size=4, rows=8)
    records = runner.run([shape], ["lens"], [registry.REGISTRY["fused-torch"]], settings, policies=("on", "off"))
    assert [(r["policy"], r["status"]) for r in records] == [("on", "skipped"), ("off", "skipped")]
    assert "time limit" in records[0]["reason"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Liger's Triton kernels need a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("policy", ["on", "off"])
def test_liger_rows_pass_the_float64_gate(policy):
    """liger-grpo and liger-lens compute exactly our loss (Liger's aggregation equals
    seq-mean-token-mean here), checked like every timed row; on the CPU through the interpreter."""
    pytest.importorskip("liger_kernel")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = make_inputs(shape_for_tokens(32, 512, torch.float32, group_size=4, rows=8), device)
    logp = check.gold_logprobs(x)
    if policy == "off":
        x = replace(x, old_logprobs=off_policy_logprobs(logp, x.completion_mask))
    for name, mode in (("liger-grpo", "grpo"), ("liger-lens", "lens")):
        impl = registry.REGISTRY[name]
        loss = impl.build(mode)(x)
        (grad,) = torch.autograd.grad(loss, impl.leaf(x))
        result = check.compare(loss, impl.logits_grad(grad), x, check.gold(x, mode, logp))
        assert result.passed and result.grad_relative_error < 1e-5, (name, result)
