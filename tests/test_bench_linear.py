"""The lm_head + loss benchmark rows (``lens_kernels.bench.linear``) compute the loss they
claim, on the CPU where they run: the loss and ``dh``/``dW`` of each row against the float64
reference on the materialised logits, on- and off-policy, so that a broken row is found here
and not on a GPU."""
from __future__ import annotations

import pytest
import torch

import lens_kernels as lk
from lens_kernels.bench.linear import LINEAR_IMPLS, fused_linear_one_pass, make_linear_inputs

from .tolerances import check

DEVICE = torch.device("cpu")
ROWS = [name for name, impl in LINEAR_IMPLS.items() if impl.unavailable(DEVICE) is None]


def _gold(x, mode):
    h = x.hidden.detach().double().requires_grad_()
    w = x.weight.detach().double().requires_grad_()
    kwargs = x.loss_kwargs()
    if kwargs["old_logprobs"] is not None:
        kwargs["old_logprobs"] = kwargs["old_logprobs"].double()
    out = lk.reference.fused_lens_loss(h @ w.T, **kwargs, mode=mode, compute_dtype=torch.float64)
    return (out.loss, *torch.autograd.grad(out.loss, [h, w]))


def test_rows_that_need_a_gpu_say_why():
    for name, impl in LINEAR_IMPLS.items():
        if name not in ROWS:
            assert "CUDA device" in impl.unavailable(DEVICE), name


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter: 1 / tiny -> inf
@pytest.mark.parametrize("policy", ["on", "off"])
@pytest.mark.parametrize("mode", ["grpo", "lens"])
@pytest.mark.parametrize("name", ROWS)
def test_row_matches_the_float64_reference(name, mode, policy):
    x = make_linear_inputs(48, 24, 101, torch.float32, DEVICE, length=8, group_size=3, policy=policy)
    assert (x.old_logprobs is None) == (policy == "on")
    loss = LINEAR_IMPLS[name].build(mode)(x)
    got = (loss, *torch.autograd.grad(loss, [x.hidden, x.weight]))
    gold = _gold(x, mode)
    # The loss is a small difference of O(1) terms: 1e-6 absolute is fp32 rounding of those terms.
    torch.testing.assert_close(got[0].double(), gold[0], rtol=1e-5, atol=1e-6)
    for label, value, expected in zip(("dh", "dW"), got[1:], gold[1:]):
        check(f"{name} {label}", value, expected, None, torch.float32)


def test_gemm_counts_follow_the_fused_linear_paths():
    for name in ("fused-linear-triton", "fused-linear-library", "fused-linear-cuda", "fused-linear-triton-gemm"):
        impl = LINEAR_IMPLS[name]
        assert [impl.gemms(m, p) for m in ("grpo", "lens") for p in ("on", "off")] == [3, 3, 4, 3], name
    assert LINEAR_IMPLS["fused-linear-triton"].gemm_rows("grpo", "on") == ("all",) * 3
    assert LINEAR_IMPLS["fused-linear-triton"].gemm_rows("lens", "on") == ("live",) + ("grad-live",) * 3
    assert LINEAR_IMPLS["fused-linear-triton-gemm"].gemm_rows("lens", "off") == ("live", "grad", "grad")
    assert LINEAR_IMPLS["fused-linear-library"].gemm_rows("lens", "on") == ("all",) * 4
    assert fused_linear_one_pass("lens", "off") and not fused_linear_one_pass("lens", "on")
    assert LINEAR_IMPLS["matmul+fused"].gemms("lens", "on") == 3


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_gpu_script_runs_end_to_end_on_a_tiny_shape(monkeypatch):
    """scripts/gpu_linear_bench.py on a tiny CPU problem with the CUDA timing and memory calls
    stubbed: every row is checked against the float64 gold and recorded, so the script does
    not first fail on a GPU's time."""
    import functools
    import importlib.util
    from pathlib import Path

    from lens_kernels.bench import linear

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_linear_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_linear_bench", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    shape = (48, 24, 101)
    monkeypatch.setattr(script, "TARGET", shape)
    monkeypatch.setattr(script, "make_linear_inputs", functools.partial(linear.make_linear_inputs, length=8,
                                                                        group_size=3))
    monkeypatch.setattr(script, "do_bench", lambda fn, warmup, rep, quantiles: (fn(), [2.0, 1.5, 2.5])[1])
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *args: None)
    for name in ("memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda *args: 0)
    records = script.run_shape(shape, "off", ["grpo", "lens"], DEVICE, 0.0)
    statuses = {(r["impl"], r["mode"]): r["status"] for r in records}
    assert all(statuses[(name, mode)] == "ok" for name in ROWS for mode in ("grpo", "lens")), [r for r in records if r["status"] != "ok" and r["status"] != "skipped"]
    assert all(r["dh_rel_err"] < script.GRAD_RTOL for r in records if r["status"] == "ok")
    logprobs = script.logprob_records(shape, DEVICE)
    assert [r["status"] for r in logprobs] == ["ok"] * len(script.LOGPROB_ROWS), logprobs
    table = script.markdown(records + logprobs, [], dict(device="cpu", torch="-", triton="-", commit="-"))
    assert table.count("| ok |") == 2 * len(ROWS) + len(script.LOGPROB_ROWS)
