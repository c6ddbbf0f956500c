"""Host time of one forward+backward of the fused loss (checks off) at a small shape, and where
it goes (cProfile of 200 calls, by own time).  Usage: python scripts/gpu_host_profile.py"""
from __future__ import annotations

import cProfile
import pstats
import time

import torch

import lens_kernels as lk
from lens_kernels.testing import make_problem


def main() -> None:
    p = make_problem(batch=32, length=128, vocab=32000, group_size=8, dtype=torch.bfloat16, device="cuda",
                     strided=False, off_policy=0.3)
    logits = p.pop("logits").detach().requires_grad_()
    for backend in ("triton", "cuda"):
        for mode in ("grpo", "lens"):
            def step():
                out = lk.fused_lens_loss(logits, **p, mode=mode, backend=backend, check_values=False)
                out.loss.backward()
                logits.grad = None
            for _ in range(10):
                step()
            times = []
            for _ in range(100):
                torch.cuda.synchronize()
                start = time.perf_counter()
                step()
                times.append((time.perf_counter() - start) * 1e3)
            times.sort()
            print(f"host ms fwd+bwd {backend} {mode} off-policy: median {times[50]:.3f}, p10 {times[10]:.3f}")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(200):
        out = lk.fused_lens_loss(logits, **p, mode="grpo", backend="triton", check_values=False)
        out.loss.backward()
        logits.grad = None
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
