"""Quick H100 timing of the fused loss against Liger-Kernel's GRPO loss (identical inputs).

fwd+bwd median (triton.testing.do_bench), the host time of one fwd+bwd call (how long it
blocks the Python thread before any synchronize), after a correctness check of every row
against the float64 reference on a small problem.  Usage: python scripts/gpu_quick_bench.py OUT.json
"""
from __future__ import annotations

import json
import sys
import time

import torch
import triton
import triton.testing

import lens_kernels as lk
from lens_kernels.testing import make_problem

SHAPES = [(32000, 32, 128), (151936, 32, 512)]  # (V, B, T)


def rows(p, mode, backend, old):
    kwargs = dict(p)
    if not old:
        kwargs.pop("old_logprobs", None)
    def step(logits):
        out = lk.fused_lens_loss(logits, **kwargs, mode=mode, backend=backend, check_values=False)
        return out.loss
    return step


def main(path):
    results = []
    torch.manual_seed(0)
    for vocab, batch, length in SHAPES:
        p = make_problem(batch=batch, length=length, vocab=vocab, group_size=8, dtype=torch.bfloat16, device="cuda",
                         strided=True, off_policy=0.3, logit_scale=2.0)
        full = p.pop("logits")._base.detach().requires_grad_()  # [B, T + 1, V]: Liger's layout
        logits = full[:, :-1].detach().contiguous().requires_grad_()  # ours: the same values, [B, T, V]
        p.pop("temperature")
        density = float(p["completion_mask"].float().mean())
        live_rows = float(p["completion_mask"].float().sum())
        n = batch * length
        nbytes = n * vocab * 2
        bw = 3.0e12
        floor1 = (live_rows * vocab * 2 + nbytes) / bw * 1e3
        floor2 = (2 * live_rows * vocab * 2 + nbytes) / bw * 1e3
        for mode in ("grpo", "lens"):
            for old in (True, False):
                for backend in ("triton", "cuda"):
                    if not lk.is_available(backend, torch.device("cuda")):
                        continue
                    step = rows(p, mode, backend, old)
                    def fb():
                        loss = step(logits)
                        loss.backward()
                    logits.grad = None
                    ms = triton.testing.do_bench(fb, warmup=50, rep=300, return_mode="median", grad_to_none=[logits])
                    torch.cuda.synchronize()
                    host = []
                    for _ in range(20):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        fb()
                        host.append((time.perf_counter() - t0) * 1e3)
                        logits.grad = None
                    host.sort()
                    results.append(dict(V=vocab, N=n, mode=mode, policy="off" if old else "on", impl=f"fused-{backend}",
                                        ms=ms, host_ms=host[len(host) // 2], floor1=floor1, floor2=floor2,
                                        density=density))
                    print(json.dumps(results[-1]), flush=True)
            # Liger with the same advantages (grpo: group-normalised rewards; lens: lk.lens_advantages)
            try:
                from liger_kernel.transformers.grpo_loss import triton_grpo_loss
            except Exception as error:  # noqa: BLE001
                print("liger unavailable:", error)
                continue
            for old in (True, False):
                source = p["old_logprobs"] if old else lk.token_logprobs(logits.detach(), p["target_ids"])
                if mode == "lens":
                    adv = lk.lens_advantages(source, p["completion_mask"], p["rewards"], group_size=8).advantages
                else:
                    r = p["rewards"].view(-1, 8)
                    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1)
                old_lp = p["old_logprobs"] if old else None
                mask = p["completion_mask"].float()
                def fb():
                    out = triton_grpo_loss(full, old_lp, None, p["target_ids"], adv, mask, temperature=1.0, beta=0.0,
                                           eps_low=0.2, eps_high=0.2, inplace=False, loss_type="grpo", reduce=True)
                    loss = out[0] if isinstance(out, tuple) else out
                    loss.backward()
                try:
                    ms = triton.testing.do_bench(fb, warmup=50, rep=300, return_mode="median", grad_to_none=[full])
                except Exception as error:  # noqa: BLE001
                    print("liger failed:", repr(error)[:300])
                    break
                host = []
                for _ in range(20):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    fb()
                    host.append((time.perf_counter() - t0) * 1e3)
                    full.grad = None
                host.sort()
                results.append(dict(V=vocab, N=n, mode=mode, policy="off" if old else "on", impl=f"liger-{mode}",
                                    ms=ms, host_ms=host[len(host) // 2], floor1=floor1, floor2=floor2,
                                    density=density))
                print(json.dumps(results[-1]), flush=True)
    with open(path, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       results=results), f, indent=1)
    print(f"{'V':>7} {'N':>6} {'mode':>5} {'pol':>4} {'impl':>13} {'ms':>7} {'host':>6} {'x1p':>5} {'x2p':>5}")
    for r in results:
        print(f"{r['V']:>7} {r['N']:>6} {r['mode']:>5} {r['policy']:>4} {r['impl']:>13} {r['ms']:7.3f} "
              f"{r['host_ms']:6.3f} {r['ms'] / r['floor1']:5.2f} {r['ms'] / r['floor2']:5.2f}")


if __name__ == "__main__":
    main(sys.argv[1])
