"""The CUDA backend's launchers (the csrc/ kernels) against ``lens_kernels.reference``.

Every parity test runs on two targets:

- ``gpu`` (marked ``gpu``): the built ``liblens_kernels_cuda.so`` on a CUDA device; skipped
  without a device or without the library.
- ``emulated``: csrc/*.cu compiled for the CPU with g++ against csrc/host_emulation/, where
  each kernel thread is a fiber, ``__syncthreads`` and warp shuffles are real rendezvous
  points and grids are capped at 3 blocks so the grid-stride loops are exercised.  It checks
  the kernels' indexing, reductions and math where no GPU is (not the hardware memory model
  or performance); skipped only without g++.

Cases that need GPU-sized inputs (64-bit offsets, ``T >= 65536``) are GPU-only.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lens_kernels import reference
from lens_kernels.backends import cuda as cuda_backend
from lens_kernels.backends.cuda import library

from .tolerances import check

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[\w:, ]+>)?)<<<(.+?), (.+?), 0, (\w+)>>>\(")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


_BUILT: list[Path] = []


def build_emulated_library(out_dir: Path) -> Path:
    """csrc/*.cu as host C++: launches become ``lk_emu::launch(grid, threads, kernel, args)``.
    Built once per test process (about 10 s): later calls return the first library."""
    if _BUILT:
        return _BUILT[0]
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ not found: cannot build the host emulation of csrc/")
    sources = []
    for cu in sorted(CSRC.glob("*.cu")):
        text = cu.read_text()
        rewritten, launches = LAUNCH.subn(r"lk_emu::launch(\2, \3, \1, ", text)
        assert launches == text.count("<<<"), f"{cu.name}: a kernel launch the emulation cannot rewrite"
        sources.append(out_dir / f"{cu.stem}.cpp")
        sources[-1].write_text(rewritten)
    library_file = out_dir / "liblens_kernels_emulated.so"
    command = [compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-Wno-unknown-pragmas",
               f"-I{CSRC / 'host_emulation'}", f"-I{CSRC}", *map(str, sources), "-o", str(library_file)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"host emulation of csrc/ does not compile:\n{result.stderr[-4000:]}"
    _BUILT.append(library_file)
    return library_file


@pytest.fixture(scope="session")
def emulated_library(tmp_path_factory) -> Path:
    return build_emulated_library(tmp_path_factory.mktemp("csrc_emulated"))


def require_gpu_library() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if library.load_error() is not None:
        pytest.skip(f"CUDA library not built: {library.load_error()}")
    code = library.load().lk_probe_device(torch.cuda.current_device())
    if code != 0:
        pytest.skip(f"CUDA library cannot run on this device: {library.load().lk_error_string(code).decode()}")
    return torch.device("cuda")


@pytest.fixture(params=[pytest.param("gpu", marks=pytest.mark.gpu), "emulated"])
def device(request, monkeypatch) -> torch.device:
    """The device the launchers run on, with the matching library loaded."""
    library.load.cache_clear()
    if request.param == "gpu":
        yield require_gpu_library()
    else:
        monkeypatch.setenv(library.LIBRARY_ENV, str(request.getfixturevalue("emulated_library")))
        monkeypatch.setenv("LK_EMU_MAX_BLOCKS", "3")
        yield torch.device("cpu")
    library.load.cache_clear()


@pytest.fixture
def gpu() -> torch.device:
    library.load.cache_clear()
    return require_gpu_library()


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits (so NaNs compare equal to themselves)."""
    return tensor.view({4: torch.int32, 2: torch.int16}[tensor.element_size()])


# ---------------------------------------------------------------------------------------------
# vocabulary pass


def make_logits(layout: str, dtype: torch.dtype, shape: tuple, device, seed: int = 0) -> torch.Tensor:
    """``[B, T, V]`` logits with the given memory layout (values ~ N(0, 3^2))."""
    batch, length, vocab = shape
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *s: (torch.randn(*s, generator=gen) * 3).to(device=device, dtype=dtype)  # noqa: E731
    if layout == "contiguous":
        return randn(batch, length, vocab)
    if layout == "shifted":  # model_logits[:, :-1]: rows start off 16-byte boundaries
        return randn(batch, length + 1, vocab)[:, :-1]
    if layout == "stride-v":  # every other vocabulary entry: no vector loads
        return randn(batch, length, 2 * vocab)[..., ::2]
    if layout == "time-major":  # stride_b < stride_t
        return randn(length, batch, vocab).transpose(0, 1)
    raise ValueError(layout)


def reference_logprobs(logits, target, temperature, dtype):
    """(float64 logp, lse), and PyTorch's own in ``dtype`` for the error budget."""
    gold = reference.token_logprobs(logits, target, temperature)
    gold_lse = torch.logsumexp(logits.double() / temperature, -1)
    native = reference.token_logprobs(logits, target, temperature, compute_dtype=dtype)
    native_lse = torch.logsumexp(logits.to(dtype) / temperature, -1)
    return gold, gold_lse, native, native_lse


def reference_grad(logits, target, temperature, grad_logp, compute_dtype):
    x = logits.detach().clone().requires_grad_()
    logp = reference.token_logprobs(x, target, temperature, compute_dtype=compute_dtype)
    (grad,) = torch.autograd.grad(logp, x, grad_logp.to(logp.dtype))
    return grad


VOCABS = (1, 1003, 4099)  # degenerate, odd (misaligned rows, scalar tails), unrolled vector loop
LAYOUTS = ("contiguous", "shifted", "stride-v", "time-major")


@pytest.mark.parametrize("vocab", VOCABS, ids=lambda v: f"V{v}")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_logprobs_forward(device, dtype, layout, vocab):
    temperature = 0.7
    logits = make_logits(layout, dtype, (3, 5, vocab), device)
    target = torch.randint(0, vocab, (3, 5), device=device)
    logp, lse, _ = cuda_backend.logprobs_forward(logits, target, 1 / temperature)
    assert logp.dtype == torch.float32 and lse.dtype == torch.float64 and logp.is_contiguous() and lse.is_contiguous()
    gold, gold_lse, native, native_lse = reference_logprobs(logits, target, temperature, dtype)
    check("logp", logp, gold, native, dtype)
    check("lse", lse, gold_lse, native_lse, dtype)


@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "inplace"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_logprobs_backward(device, dtype, layout, inplace):
    temperature, shape = 1.3, (2, 4, 1003)
    logits = make_logits(layout, dtype, shape, device, seed=1)
    target = torch.randint(0, shape[2], shape[:2], device=device)
    _, lse, _ = cuda_backend.logprobs_forward(logits, target, 1 / temperature)
    grad_logp = torch.randn(shape[:2], device=device)
    grad_logp[1, 2] = 0.0  # this row's logits are never read: NaN there must not matter
    gold = reference_grad(logits, target, temperature, grad_logp, torch.float64)
    native = reference_grad(logits, target, temperature, grad_logp, dtype)
    storage = logits._base if logits._base is not None else logits
    logits[1, 2] = float("nan")
    untouched = storage.clone()
    grad = cuda_backend.logprobs_backward(grad_logp, logits, target, lse, 1 / temperature, inplace)
    assert grad.dtype == dtype and grad.shape == logits.shape
    if inplace:
        assert grad is logits
        outside = torch.ones_like(storage, dtype=torch.bool)
        outside.as_strided(logits.shape, logits.stride(), logits.storage_offset()).fill_(False)
        assert torch.equal(bits(storage)[outside], bits(untouched)[outside]), "in-place backward wrote outside the view"
    else:
        assert grad.is_contiguous()
        assert torch.equal(bits(storage), bits(untouched)), "logits were modified"
    assert torch.equal(grad[1, 2], torch.zeros_like(grad[1, 2])), "a row with grad_logp == 0 is not exactly 0"
    check("grad", grad, gold, native, dtype)


def test_non_finite_logits_poison_only_their_row(device):
    logits = make_logits("shifted", torch.float32, (2, 3, 1003), device)
    target = torch.zeros((2, 3), dtype=torch.int64, device=device)
    logits[0, 1, 500] = float("nan")
    logits[1, 2, 7] = float("inf")
    logp, lse, _ = cuda_backend.logprobs_forward(logits, target, 1.0)
    bad = torch.zeros((2, 3), dtype=torch.bool, device=device)
    bad[0, 1] = bad[1, 2] = True
    assert torch.equal(~torch.isfinite(logp), bad)
    assert torch.isnan(lse[0, 1]) and torch.isfinite(lse[~bad]).all()


# ---------------------------------------------------------------------------------------------
# GPU-sized cases


@pytest.mark.gpu
def test_gpu_offsets_beyond_int32(gpu):
    device = gpu
    vocab = 50257
    length = 2**31 // vocab + 2  # B*T*V > 2**31 in one batch row: offsets need 64 bits
    full = torch.empty((1, length + 1, vocab), dtype=torch.bfloat16, device=device).normal_(0, 3)
    logits = full[:, :-1]
    target = torch.randint(0, vocab, (1, length), device=device)
    logp, lse, _ = cuda_backend.logprobs_forward(logits, target, 1.0)
    grad_logp = torch.zeros((1, length), device=device)
    grad_logp[0, -3:] = torch.randn(3, device=device)
    grad = cuda_backend.logprobs_backward(grad_logp, logits, target, lse, 1.0, False)
    tail, tail_target = logits[:, -3:], target[:, -3:]  # the rows past the int32 boundary
    gold, gold_lse, native, native_lse = reference_logprobs(tail, tail_target, 1.0, torch.bfloat16)
    check("logp", logp[:, -3:], gold, native, torch.bfloat16)
    check("lse", lse[:, -3:], gold_lse, native_lse, torch.bfloat16)
    gold_grad = reference_grad(tail, tail_target, 1.0, grad_logp[:, -3:], torch.float64)
    native_grad = reference_grad(tail, tail_target, 1.0, grad_logp[:, -3:], torch.bfloat16)
    check("grad", grad[:, -3:], gold_grad, native_grad, torch.bfloat16)
    assert not grad[:, :-3].any()


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [17, 151936], ids=["V17", "V151936"])
def test_gpu_long_sequences_and_large_vocabularies(gpu, vocab):
    device = gpu
    length = 65536 + 3 if vocab == 17 else 64
    logits = make_logits("shifted", torch.float32, (2, length, vocab), device, seed=3)
    target = torch.randint(0, vocab, (2, length), device=device)
    logp, lse, _ = cuda_backend.logprobs_forward(logits, target, 1.0)
    gold, gold_lse, _, _ = reference_logprobs(logits, target, 1.0, torch.float32)
    check("logp", logp, gold, None, torch.float32)
    check("lse", lse, gold_lse, None, torch.float32)
    grad_logp = torch.randn((2, length), device=device)
    grad = cuda_backend.logprobs_backward(grad_logp, logits, target, lse, 1.0, False)
    check("grad", grad, reference_grad(logits, target, 1.0, grad_logp, torch.float64), None, torch.float32)


@pytest.mark.gpu
def test_gpu_is_available_and_streams(gpu):
    device = gpu
    assert cuda_backend.is_available(device) and not cuda_backend.is_available(torch.device("cpu"))
    logits = make_logits("contiguous", torch.bfloat16, (4, 8, 1003), device)
    target = torch.randint(0, 1003, (4, 8), device=device)
    expected, _, _ = cuda_backend.logprobs_forward(logits, target, 1.0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        logp, _, _ = cuda_backend.logprobs_forward(logits, target, 1.0)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(logp, expected)
