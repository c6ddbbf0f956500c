#!/usr/bin/env python
"""lm_head + LENS loss on one GPU (issue 9): correctness first, then fwd+bwd time, peak memory
and TFLOP/s of ``fused-linear-triton`` against ``matmul+fused`` (and Liger / Cut Cross-Entropy
where importable).

    python scripts/gpu_linear_bench.py --out benchmarks/results/h100-linear [--quick]

1. Small shapes (V = 1003 and 4099, N and d off every block), fp32 and bf16, lens and grpo:
   ``lk.fused_linear_lens_loss(backend="triton")`` against ``lk.reference.fused_lens_loss`` on
   the materialised logits in float64 (loss, dh, dW, dbias), and for bf16 no worse than the
   same reference run in bf16 (PyTorch's own error).
2. Target shape (N=16384, d=2048, V=151936, bf16): every implementation's loss, dh and dW
   against a float64 gold (the torch fused-linear path on float64 copies of the bf16 inputs,
   ~8 GB and about a second on an H100).  An implementation is timed only where it passes.
3. Sweep (``--quick``: the target shape only): N in {8192, 16384, 32768}, d in {2048, 4096},
   V in {128256, 151936}, grpo and lens, on-policy and off-policy (``--policies``).  fwd+bwd
   median of ``triton.testing.do_bench``; peak memory above the inputs and the returned dh/dW;
   TFLOP/s over the GEMMs run, counting only the 128-row tiles a skipping GEMM computes
   (``LinearImpl.gemm_rows``: every row for cuBLAS; for the Triton GEMMs the tiles with a
   completion token (logits) or a nonzero coefficient (dh, dW), in the row order they use).  Liger and CCE (grpo
   only) are timed at the target shape only, to stay within minutes.
4. The no-grad log-prob pass (old / reference log-probs) at the target shape: Triton tiles
   (with and without the completion mask), cuBLAS row blocks, and ``h @ W.T`` then
   ``lk.token_logprobs``; forward time ("fwd+bwd" column) and peak memory above the inputs and
   the returned log-probs.

Writes ``linear.json`` and ``linear.md`` into ``--out`` and prints a compact table last.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import lens_kernels as lk  # noqa: E402
from lens_kernels.bench.linear import LINEAR_IMPLS, LinearInputs, make_linear_inputs  # noqa: E402
from lens_kernels.testing import group_rewards  # noqa: E402

TARGET = (16384, 2048, 151936)
# (V, d, B, T) of the float64 checks: no dimension a multiple of any block.
SMALL_SHAPES = ((1003, 96, 4, 77), (4099, 200, 6, 45))
# Pass marks at the target shape against the float64 gold (the errors themselves are recorded).
LOSS_TOL, GRAD_RTOL = 1e-3, 5e-2
MB = 2**20


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def grads_of(loss: torch.Tensor, x: LinearInputs):
    return torch.autograd.grad(loss, [x.hidden, x.weight])


def rel(value: torch.Tensor, gold: torch.Tensor) -> float:
    """max |value - gold| / max |gold| (NaN-aware)."""
    diff = (value.double() - gold.double()).abs().max().item()
    scale = gold.double().abs().max().item()
    return diff / scale if scale else diff


# ---------------------------------------------------------------------------------------------
# 1. small shapes against float64
# ---------------------------------------------------------------------------------------------

def small_problem(vocab: int, dim: int, batch: int, length: int, dtype: torch.dtype, mode: str, device):
    """``(hidden, weight, bias, loss kwargs)``: a third of the positions masked, row 0 empty."""
    gen = torch.Generator().manual_seed(vocab)
    hidden = torch.randn(batch, length, dim, generator=gen).to(device, dtype)
    weight = (torch.randn(vocab, dim, generator=gen) * 3 / dim**0.5).to(device, dtype)
    bias = torch.randn(vocab, generator=gen).to(device, dtype)
    ids = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
    mask = torch.rand(batch, length, generator=gen).to(device) < 0.7
    mask[0] = False
    rewards = group_rewards(batch // 2, 2, gen).to(device)
    return hidden, weight, bias, dict(target_ids=ids, completion_mask=mask, rewards=rewards, group_size=2,
                                      mode=mode, temperature=0.9)


def small_checks(device: torch.device) -> list[dict]:
    """Every ``gemm`` choice of the Triton backend against float64 (bf16: PyTorch's own error)."""
    results = []
    for vocab, dim, batch, length in SMALL_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for mode in ("lens", "grpo"):
                hidden, weight, bias, kwargs = small_problem(vocab, dim, batch, length, dtype, mode, device)

                def run(compute, gemm="auto"):
                    leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
                    if compute is None:
                        out = lk.fused_linear_lens_loss(leaves[0], leaves[1], bias=leaves[2], **kwargs,
                                                        backend="triton", gemm=gemm)
                    else:
                        logits = leaves[0].to(compute) @ leaves[1].to(compute).T + leaves[2].to(compute)
                        out = lk.reference.fused_lens_loss(logits, **kwargs, compute_dtype=compute)
                    return [out.loss, *torch.autograd.grad(out.loss, leaves)]

                gold = run(torch.float64)
                native = run(dtype) if dtype != torch.float32 else None
                for gemm in ("auto", "library", "triton"):
                    got = run(None, gemm)
                    record = dict(vocab=vocab, dim=dim, tokens=batch * length, dtype=str(dtype).split(".")[-1],
                                  mode=mode, gemm=gemm)
                    ok = True
                    for i, name in enumerate(("loss", "dh", "dW", "dbias")):
                        err = rel(got[i], gold[i])
                        bound = 1e-4 if native is None else rel(native[i], gold[i]) + 1e-3
                        record[f"{name}_rel_err"] = err
                        record[f"{name}_bound"] = bound
                        ok &= err <= bound
                    record["passed"] = bool(ok)
                    results.append(record)
                    log(f"  small V={vocab} d={dim} {record['dtype']} {mode} gemm={gemm}: {'ok' if ok else 'FAILED'} "
                        + " ".join(f"{n}={record[f'{n}_rel_err']:.1e}" for n in ("loss", "dh", "dW", "dbias")))
    return results


# ---------------------------------------------------------------------------------------------
# 2. and 3. target-shape check, timing, memory
# ---------------------------------------------------------------------------------------------

def float64_gold(x: LinearInputs, mode: str):
    """Loss, dh, dW and advantages of the torch fused-linear path on float64 copies."""
    h = x.hidden.detach().double().requires_grad_()
    w = x.weight.detach().double().requires_grad_()
    out = lk.fused_linear_lens_loss(h, w, **x.loss_kwargs(), mode=mode, backend="torch", check_values=False)
    dh, dw = torch.autograd.grad(out.loss, [h, w])
    return out.loss.item(), dh, dw, out.advantages


def row_fractions(x: LinearInputs, advantages: torch.Tensor, block: int = 128) -> dict[str, float]:
    """Share of the ``block``-row tiles of the flattened batch that a skipping GEMM computes
    (``LinearImpl.gemm_rows``): ``"live"``, tiles with a completion token once those rows are
    packed first; ``"grad"``, tiles with a completion token of a row with a nonzero advantage
    once those are packed first (on-policy, nothing is clipped); ``"grad-live"``, the same
    tiles in the live-first order; ``"all"``: 1."""
    def tiles(rows: torch.Tensor) -> float:
        pad = (-rows.numel()) % block
        return float(torch.cat([rows, rows.new_zeros(pad)]).view(-1, block).any(1).float().mean())

    live = x.completion_mask.reshape(-1)
    grad = (x.completion_mask & (advantages != 0)[:, None]).reshape(-1)
    live_first = torch.argsort((~live).to(torch.int8), stable=True)
    packed = torch.sort(grad.to(torch.int8), descending=True).values.bool()
    return {"all": 1.0, "live": tiles(live[live_first]), "grad": tiles(packed), "grad-live": tiles(grad[live_first])}


def gemm_tflop(impl: str, x: LinearInputs, mode: str, fractions: dict[str, float]) -> float:
    """TFLOP of the GEMMs ``impl`` runs, counting only the row tiles it computes."""
    n, d, v = x.dims
    return 2 * n * v * d * sum(fractions[rows] for rows in LINEAR_IMPLS[impl].gemm_rows(mode, x.policy)) / 1e12


def measure(impl_name: str, mode: str, x: LinearInputs, gold, fractions, check: bool) -> dict:
    impl = LINEAR_IMPLS[impl_name]
    n, d, v = x.dims
    record = dict(impl=impl_name, mode=mode, policy=x.policy, tokens=n, dim=d, vocab=v, status="ok", reason=None)
    reason = impl.unavailable(x.hidden.device) or (None if mode in impl.modes else f"computes {list(impl.modes)} only")
    if reason:
        return {**record, "status": "skipped", "reason": reason}
    try:
        fn = impl.build(mode)
        start = time.perf_counter()
        loss = fn(x)
        dh, dw = grads_of(loss, x)
        torch.cuda.synchronize()
        record["first_call_s"] = time.perf_counter() - start
        if check:
            record.update(loss=loss.item(), loss_err=abs(loss.item() - gold[0]),
                          dh_rel_err=rel(dh, gold[1]), dw_rel_err=rel(dw, gold[2]))
            passed = record["loss_err"] <= LOSS_TOL * max(1.0, abs(gold[0])) and record["dh_rel_err"] <= GRAD_RTOL \
                and record["dw_rel_err"] <= GRAD_RTOL
            if not passed:
                return {**record, "status": "failed-check", "reason": "loss/dh/dW off the float64 gold; not timed"}
        del loss, dh, dw
        release()

        def step():
            return grads_of(fn(x), x)

        fast = impl_name.startswith("fused-linear") or impl_name == "matmul+fused"
        ms = do_bench(step, warmup=1, rep=300 if fast else 50,
                      quantiles=[0.5, 0.2, 0.8])
        record.update(fwdbwd_median_ms=ms[0], fwdbwd_q20_ms=ms[1], fwdbwd_q80_ms=ms[2])
        release()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grads = step()
        torch.cuda.synchronize()
        returned = sum(g.numel() * g.element_size() for g in grads)
        record["peak_above_inputs_and_grads_mb"] = (torch.cuda.max_memory_allocated() - base - returned) / MB
        del grads
        tflop = gemm_tflop(impl_name, x, mode, fractions)
        record.update(gemm_tflop=tflop, gemms=impl.gemms(mode, x.policy), tflops=tflop / (ms[0] * 1e-3),
                      live_tile_fraction=fractions["live"], grad_tile_fraction=fractions["grad"],
                      grad_live_tile_fraction=fractions["grad-live"])
    except Exception as err:  # recorded; the sweep goes on
        oom = isinstance(err, torch.cuda.OutOfMemoryError)
        if not oom:
            log(traceback.format_exc())
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        record.update(status="oom" if oom else "error", reason=f"{type(err).__name__}: {first}"[:300])
    finally:
        release()
    return record


def shapes(quick: bool) -> list[tuple[int, int, int]]:
    if quick:
        return [TARGET]
    return [(n, d, v) for v in (151936, 128256) for d in (2048, 4096) for n in (8192, 16384, 32768)]


def markdown(records: list[dict], small: list[dict], env: dict) -> str:
    lines = [f"# lm_head + loss, {env['device']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit']})",
             "", f"Small-shape float64 checks: {sum(r['passed'] for r in small)}/{len(small)} passed.", "",
             "| impl | mode | policy | N | d | V | GEMMs | fwd+bwd ms | peak MB above inputs+grads | GEMM TFLOP/s "
             "| dh err | dW err | status |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in records:
        def f(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else ""
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        lines.append(f"| {r['impl']} | {r['mode']} | {r.get('policy', 'on')} | {r['tokens']} | {r['dim']} | {r['vocab']} "
                     f"| {f('gemms', 'd')} | {f('fwdbwd_median_ms', '.2f')} "
                     f"| {f('peak_above_inputs_and_grads_mb', '.0f')} | {f('tflops', '.0f')} | {f('dh_rel_err', '.1e')} "
                     f"| {f('dw_rel_err', '.1e')} | {status} |")
    return "\n".join(lines) + "\n"


def run_shape(dims, policy: str, modes: list[str], device: torch.device, started: float) -> list[dict]:
    """Every implementation and mode on one shape and policy (checked against the float64 gold at
    the target shape, where Liger and CCE also run)."""
    n, d, v = dims
    log(f"== N={n} d={d} V={v} bf16, {policy}-policy ({time.perf_counter() - started:.0f} s)")
    try:
        x = make_linear_inputs(n, d, v, torch.bfloat16, device, policy=policy)
    except torch.cuda.OutOfMemoryError:
        return [dict(impl=i, mode=m, policy=policy, tokens=n, dim=d, vocab=v, status="oom",
                     reason="inputs do not fit") for m in modes for i in LINEAR_IMPLS]
    records = []
    at_target = dims == TARGET
    for mode in modes:
        gold = float64_gold(x, mode) if at_target else None
        adv = gold[3] if gold else lk.fused_linear_lens_loss(
            x.hidden.detach(), x.weight.detach(), **x.loss_kwargs(), mode=mode, check_values=False).advantages
        fractions = row_fractions(x, adv)
        for name in LINEAR_IMPLS:
            if name in ("liger-fused-linear-grpo", "cut-cross-entropy") and not at_target:
                continue
            record = measure(name, mode, x, gold, fractions, check=at_target)
            records.append(record)
            log(f"   {name:<24} {mode:<4} {record['status']:<6} "
                + (f"{record['fwdbwd_median_ms']:.2f} ms, +{record['peak_above_inputs_and_grads_mb']:.0f} MB, "
                   f"{record['tflops']:.0f} TFLOP/s" if record["status"] == "ok" else str(record["reason"])))
        del gold
        release()
    del x
    release()
    return records


# The no-grad log-prob pass (old / reference log-probs): the same inputs, no gradient.
# The "-masked" row is given the completion mask (0 outside it, padding skipped): it is checked
# against the masked gold and its TFLOP/s counts only the 128-row tiles it computes.
LOGPROB_ROWS = {
    "fused-linear-logprobs-tiles": lambda x: lk.fused_linear_token_logprobs(
        x.hidden, x.weight, x.target_ids, backend="triton", check_values=False, gemm="triton"),
    "fused-linear-logprobs-tiles-masked": lambda x: lk.fused_linear_token_logprobs(
        x.hidden, x.weight, x.target_ids, backend="triton", check_values=False, gemm="triton",
        completion_mask=x.completion_mask),
    "fused-linear-logprobs-library": lambda x: lk.fused_linear_token_logprobs(
        x.hidden, x.weight, x.target_ids, backend="triton", check_values=False, gemm="library"),
    "matmul+token_logprobs": lambda x: lk.token_logprobs(x.hidden @ x.weight.T, x.target_ids, check_values=False),
}


def logprob_records(dims, device: torch.device) -> list[dict]:
    """fwd-only time and peak memory of the no-grad log-prob pass, each row checked first
    against float64 log-probs (torch fused-linear path on float64 copies)."""
    n, d, v = dims
    x = make_linear_inputs(n, d, v, torch.bfloat16, device)
    records = []
    with torch.no_grad():
        gold = lk.fused_linear_token_logprobs(x.hidden.double(), x.weight.double(), x.target_ids, backend="torch",
                                              check_values=False)
        live_tiles = row_fractions(x, torch.zeros(x.rewards.shape, device=device))["live"]
        for name, fn in LOGPROB_ROWS.items():
            masked = name.endswith("-masked")
            record = dict(impl=name, mode="logprobs", policy="-", tokens=n, dim=d, vocab=v, gemms=1, status="ok",
                          reason=None)
            try:
                value = fn(x)
                stray = 0.0  # the masked row must give exactly 0 outside the mask
                if masked:
                    stray = torch.where(x.completion_mask, 0, value).abs().max().item()
                    value = torch.where(x.completion_mask, value, gold)
                err = rel(value, gold)
                record["logp_abs_err"] = (value.double() - gold).abs().max().item()
                del value
                if not (err < 1e-2 and stray == 0):
                    records.append({**record, "status": "failed-check",
                                    "reason": f"logp rel err {err:.1e}, largest outside the mask {stray:.1e}"})
                    continue
                ms = do_bench(functools.partial(fn, x), warmup=1, rep=200, quantiles=[0.5, 0.2, 0.8])
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                out = fn(x)
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size()) / MB
                tflop = 2 * n * v * d * (live_tiles if masked else 1.0) / 1e12
                record.update(fwdbwd_median_ms=ms[0], fwdbwd_q20_ms=ms[1], fwdbwd_q80_ms=ms[2],
                              peak_above_inputs_and_grads_mb=peak, gemm_tflop=tflop, tflops=tflop / (ms[0] * 1e-3))
                del out
            except Exception as err:  # recorded; the run goes on
                record.update(status="error", reason=f"{type(err).__name__}: {err}"[:300])
            records.append(record)
            log(f"   {name:<30} {record['status']:<6} " + (
                f"{record['fwdbwd_median_ms']:.2f} ms (forward only), +{record['peak_above_inputs_and_grads_mb']:.0f} MB"
                if record["status"] == "ok" else str(record["reason"])))
    del x, gold
    release()
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for linear.json and linear.md")
    parser.add_argument("--quick", action="store_true", help="the target shape N=16384 d=2048 V=151936 only")
    parser.add_argument("--modes", default="grpo,lens", help="loss modes, comma-separated (default grpo,lens)")
    parser.add_argument("--policies", default="on,off",
                        help="on: old = logp.detach(); off: old log-probs given (a noisy copy); default on,off")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda")
    commit = os.popen(f"git -C {ROOT} rev-parse --short HEAD 2>/dev/null").read().strip() or "unknown"
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               python=platform.python_version(), commit=commit)
    started = time.perf_counter()
    log("== 1. small shapes against float64")
    small = small_checks(device)
    records = []
    modes = args.modes.split(",")

    def save(partial: bool) -> None:  # rewritten after every shape, so a run cut short keeps its numbers
        with open(os.path.join(args.out, "linear.json"), "w") as fh:
            json.dump(dict(env=env, partial=partial, small_checks=small, records=records), fh, indent=1)

    for dims in shapes(args.quick):
        for policy in args.policies.split(","):
            records += run_shape(dims, policy, modes, device, started)
            save(partial=True)
    log("== no-grad log-probs at the target shape (the old / reference log-prob pass)")
    records += logprob_records(TARGET, device)
    env["wall_s"] = time.perf_counter() - started
    save(partial=False)
    text = markdown(records, small, env)
    with open(os.path.join(args.out, "linear.md"), "w") as fh:
        fh.write(text)
    print(text)
    failed = [r for r in small if not r["passed"]] + [r for r in records if r["status"] == "failed-check"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
