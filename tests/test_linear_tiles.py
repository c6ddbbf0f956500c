"""The Triton fused-linear tiles: the autotuned configurations (``linear_tile``; invariants the
kernels rely on, checked on the GPU candidates even where no GPU is present: the interpreter
runs one tiny configuration), and the one-pass block GEMMs (``linear_block_gemm``) doing no
work for rows that need none."""
from __future__ import annotations

import pytest
import torch

from lens_kernels.backends.triton import linear_tile

from .conftest import DEVICE, runnable_backends

FAMILIES = ("logits", "dh", "dw")
# Shared memory of one Hopper multiprocessor available to a block (227 KB).
HOPPER_SMEM = 227 * 1024


@pytest.fixture
def gpu_tiles(monkeypatch):
    monkeypatch.setattr(linear_tile, "interpreting", lambda: False)
    return {dtype: linear_tile.tiles_for(dtype, torch.device("cuda")) for dtype in (torch.bfloat16, torch.float32)}


def test_every_forward_tile_width_divides_the_split(gpu_tiles):
    """``_partials_kernel`` walks ``split_cols // BLOCK_V`` tiles per split: a width that does
    not divide it would leave vocabulary columns out of the logsumexp."""
    for size, configs in linear_tile.gpu_configs()["logits"].items():
        for config in configs:
            width = config.kwargs["BLOCK_V"]
            for tiles in gpu_tiles.values():
                assert tiles.split_cols % width == 0 and tiles.chunk_align % width == 0, (size, config)


@pytest.mark.parametrize("family", FAMILIES)
def test_candidates_fit_hopper_shared_memory(family):
    """Operand tiles times pipeline stages within one multiprocessor's shared memory (a
    candidate that does not fit would only be discarded by the autotuner, never picked)."""
    for size, configs in linear_tile.gpu_configs()[family].items():
        for config in configs:
            b = config.kwargs
            if family == "logits":
                tile = b["BLOCK_N"] * b["BLOCK_K"] + b["BLOCK_K"] * b["BLOCK_V"]
            elif family == "dh":
                tile = b["BLOCK_N"] * b["BLOCK_K"] + b["BLOCK_K"] * b["BLOCK_D"]
            else:
                tile = (b["BLOCK_V"] + b["BLOCK_D"]) * 64  # dW: BLOCK_K is Tiles.dw_rows = 64
            assert config.num_stages * tile * size <= HOPPER_SMEM, (family, size, config)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_keeps_the_candidates_of_the_operand_dtype(family, monkeypatch):
    configs = linear_tile.gpu_configs()[family]
    monkeypatch.setattr(linear_tile, "CONFIGS", {family: configs})
    prune = linear_tile._for_dtype(family, "x_ptr")
    every = configs[2] + configs[4]
    for dtype, size in ((torch.bfloat16, 2), (torch.float16, 2), (torch.float32, 4)):
        kept = prune(every, {"x_ptr": torch.empty(1, dtype=dtype)})
        assert kept == configs[size] and not any(c in kept for c in configs[6 - size])


def test_the_interpreter_runs_one_configuration_per_family():
    """One configuration, shared by both element sizes: the autotuner never benchmarks on the CPU."""
    for family, by_size in linear_tile.interpreter_configs().items():
        assert len(by_size[2]) == 1 and by_size[2] is by_size[4], family


def close(value, gold):
    """fp32 GEMM results against float64 ones: fp32 rounding of sums of a few dozen terms (NaN
    where a row's hidden state is)."""
    torch.testing.assert_close(value.double(), gold, rtol=1e-5, atol=1e-5 * float(gold.nan_to_num().abs().max()),
                               equal_nan=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter, NaN rows
@pytest.mark.skipif("triton" not in runnable_backends(), reason="needs Triton (CUDA, or TRITON_INTERPRET=1)")
def test_block_gemms_skip_rows_that_need_no_work():
    """Logits are made only for row tiles holding a live row (a sentinel survives elsewhere);
    dh is exactly 0 and dW untouched by rows of zero coefficient, whose hidden states are NaN;
    the rest matches float64 GEMMs, dW accumulated over three spans."""
    from lens_kernels.backends.triton.linear_block_gemm import TritonBlockGemms

    gen = torch.Generator().manual_seed(0)
    rows, dim, vocab, span = 3 * 16, 24, 70, 16  # spans of one interpreter row tile
    hidden = torch.randn(rows, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen)
    bias = torch.randn(vocab, generator=gen)
    live = torch.ones(rows, dtype=torch.bool)
    live[16:32] = False  # the second span: no live row
    live[40:] = False
    coefficient = live.float()
    coefficient[3:9] = 0  # live, zero advantage
    hidden = torch.where((coefficient != 0)[:, None], hidden, float("nan"))
    hidden, weight, bias, live, coefficient = (t.to(DEVICE) for t in (hidden, weight, bias, live, coefficient))
    gemms = TritonBlockGemms(hidden, weight, bias, live, coefficient, span)
    dz_all = torch.randn(rows, vocab, generator=gen).to(DEVICE) * coefficient[:, None]
    dh = torch.full((rows, dim), 7.0, device=DEVICE)
    dw = torch.full((vocab, dim), 7.0, device=DEVICE)
    db = torch.zeros(vocab, device=DEVICE)
    for start in range(0, rows, span):
        r = slice(start, start + span)
        z = torch.full((span, vocab), -3.0, device=DEVICE)
        gemms.logits(z, r)
        if live[r].any():
            gold = hidden[r].double() @ weight.double().T + bias.double()
            close(z[live[r]], gold[live[r]])
        else:
            assert torch.equal(z, torch.full_like(z, -3.0)), "a span with no live row made logits"
        gemms.grads(dz_all[r].clone(), r, dh, dw, db)
    on = coefficient != 0
    assert torch.equal(dh[~on], torch.zeros_like(dh[~on]))
    close(dh[on], dz_all[on].double() @ weight.double())
    close(dw, dz_all[on].double().T @ hidden[on].double())
    close(db, dz_all.double().sum(0))


@pytest.mark.skipif("triton" not in runnable_backends(), reason="needs Triton (CUDA, or TRITON_INTERPRET=1)")
def test_stores_round_to_nearest_even_like_torch():
    """``linear_tile.rounded``: the kernels' bf16 stores give PyTorch's own rounding (the CPU
    interpreter would truncate)."""
    import triton
    import triton.language as tl

    @triton.jit
    def store(x_ptr, y_ptr, N: tl.constexpr, EMULATE: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(y_ptr + i, linear_tile.rounded(tl.load(x_ptr + i), y_ptr.dtype.element_ty, EMULATE))

    x = torch.randn(256, generator=torch.Generator().manual_seed(0)) * 10
    x[:4] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, float("inf"), -0.0])  # ties to even, inf, -0
    x = x.to(DEVICE)
    y = torch.empty(256, dtype=torch.bfloat16, device=DEVICE)
    store[(1,)](x, y, N=256, EMULATE=linear_tile.tiles_for(torch.bfloat16, x.device).upcast)
    assert torch.equal(y, x.to(torch.bfloat16))


def test_autotuning_can_be_switched_off():
    """LENS_KERNELS_AUTOTUNE=0 leaves one candidate per family and element size (the measured one)."""
    configs = linear_tile._measured_only(linear_tile.gpu_configs())
    for family, by_size in configs.items():
        for size, found in by_size.items():
            assert [c.kwargs for c in found] == [linear_tile.gpu_configs()[family][size][0].kwargs], (family, size)


def test_accumulated_outputs_are_restored_around_timed_runs_only_when_accumulating():
    pre, post = linear_tile._restore_when_accumulating(["out"])
    out = torch.ones(3)
    pre({"out": out, "ACCUMULATE": True})
    out += 5  # a timed run adding into it
    post({"out": out, "ACCUMULATE": True}, None)
    assert torch.equal(out, torch.ones(3))
    pre({"out": out, "ACCUMULATE": False})  # written once: nothing saved, nothing restored
    out.fill_(2)
    post({"out": out, "ACCUMULATE": False}, None)
    pre({"out": out, "ACCUMULATE": True}, reset_only=True)  # Triton's reset after tuning
    out.fill_(3)
    post({"out": out, "ACCUMULATE": True}, None)
    assert torch.equal(out, torch.full((3,), 3.0))


def test_switched_off_autotuning_times_nothing(monkeypatch):
    """LENS_KERNELS_AUTOTUNE=0: the autotuner's timing function runs no kernel (older Triton
    times even a single pruned candidate)."""
    import inspect

    import triton
    import triton.language as tl

    if "do_bench" not in inspect.signature(triton.autotune).parameters:
        pytest.skip("this Triton's autotune takes no do_bench")
    monkeypatch.setattr(linear_tile, "TUNING", False)

    @linear_tile.autotuned("dw", "x_ptr", key=[])
    @triton.jit
    def kernel(x_ptr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
        pass

    assert kernel.do_bench is linear_tile._untimed
    assert linear_tile._untimed(lambda: pytest.fail("ran a kernel")) == [0.0, 0.0, 0.0]


def test_autotuning_keys_on_the_hidden_size_and_dtypes_only():
    """A new batch size, length or vocabulary never re-times the candidates (SPEC 3: nothing is
    redone per T or V); d and the dtypes pick the tiles."""
    from lens_kernels.backends.triton import linear_block_gemm, linear_backward, linear_forward, linear_grad_gemm

    kernels = (linear_forward._partials_kernel, linear_backward._dz_kernel, linear_grad_gemm._dh_kernel,
               linear_grad_gemm._dw_kernel, linear_block_gemm._block_logits_kernel)
    for kernel in kernels:
        assert list(kernel.keys) == ["D"], kernel
