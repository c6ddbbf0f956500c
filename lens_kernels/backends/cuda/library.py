"""Finding, loading and checking ``liblens_kernels_cuda.so``, the C ABI of csrc/.

``SIGNATURES`` mirrors csrc/lens_kernels_cuda.h: every exported function with its ctypes
result and argument types (the tests compare it with the library's dynamic symbol table).
The library is looked for at ``$LENS_KERNELS_CUDA_LIBRARY`` if set, else next to this file in
``_lib/`` (where ``pip install`` / ``pip install -e`` put it).
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Optional

import torch

LIBRARY_FILE = "liblens_kernels_cuda.so"
LIBRARY_ENV = "LENS_KERNELS_CUDA_LIBRARY"
ABI_VERSION = 3  # LK_ABI_VERSION

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # LK_FLOAT32 ...


class SurrogateConfig(ctypes.Structure):
    """``lk_surrogate_config``."""

    _fields_ = [
        ("has_clip_ratio_c", ctypes.c_int32),
        ("has_ref", ctypes.c_int32),
        ("add_kl", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("eps_low", ctypes.c_double),
        ("eps_high", ctypes.c_double),
        ("clip_ratio_c", ctypes.c_double),
        ("beta", ctypes.c_double),
    ]


_PTR, _I64, _INT, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIZES_STRIDES = (_I64,) * 6  # batch, length, vocab, stride_b, stride_t, stride_v
_ROWS = (_PTR, _I64, _I64)  # a strided [B, T] input: pointer, stride_b, stride_t
_CONFIG = ctypes.POINTER(SurrogateConfig)

SIGNATURES = {
    "lk_abi_version": (_INT, ()),
    "lk_surrogate_config_size": (ctypes.c_size_t, ()),
    "lk_error_string": (ctypes.c_char_p, (_INT,)),
    "lk_probe_device": (_INT, (_INT,)),
    "lk_logprobs_forward": (
        _INT,
        (_PTR, _INT) + _SIZES_STRIDES + _ROWS + _ROWS + (_F32, _F32, _PTR, _PTR, _PTR, _PTR),
    ),
    "lk_logprobs_backward": (
        _INT,
        (_PTR, _PTR, _PTR, _PTR, _PTR, _INT) + _SIZES_STRIDES + _ROWS
        + (_PTR, _F32, _F32, _PTR, _I64, _I64, _I64, _PTR),
    ),
    "lk_token_loss": (
        _INT,
        (_PTR,) + _ROWS * 3 + (_PTR, _I64, _PTR, _I64, _I64, _CONFIG, _PTR, _PTR, _PTR),
    ),
    "lk_fused_loss": (
        _INT,
        (_PTR, _INT) + _SIZES_STRIDES + _ROWS * 4 + (_PTR, _I64, _PTR, _F32, _F32, _CONFIG)
        + (_PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR),
    ),
}


def library_path() -> Path:
    override = os.environ.get(LIBRARY_ENV)
    return Path(override) if override else Path(__file__).resolve().parent / "_lib" / LIBRARY_FILE


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL:
    """The loaded library with its signatures set; ``OSError`` saying why it cannot be used."""
    path = library_path()
    if not path.is_file():
        raise OSError(
            f"{path} not found: build the CUDA backend with `LENS_KERNELS_CUDA=1 pip install .` "
            f"(needs nvcc and cmake), or point {LIBRARY_ENV} at a built library"
        )
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in SIGNATURES.items():
        try:
            function = getattr(lib, name)
        except AttributeError as error:
            raise OSError(f"{path} does not export {name}: rebuild it from this version's csrc/") from error
        function.restype, function.argtypes = restype, list(argtypes)
    if lib.lk_abi_version() != ABI_VERSION:
        raise OSError(f"{path} has C ABI version {lib.lk_abi_version()}, this package needs {ABI_VERSION}: rebuild it")
    if lib.lk_surrogate_config_size() != ctypes.sizeof(SurrogateConfig):
        raise OSError(f"{path}: lk_surrogate_config layout differs from this package's: rebuild it")
    return lib


def load_error() -> Optional[str]:
    """Why the library cannot be loaded, or None when it loads."""
    try:
        load()
    except OSError as error:
        return str(error)
    return None


def check(code: int, what: str) -> None:
    """Raise ``RuntimeError`` naming the CUDA (or argument) error of a nonzero C result."""
    if code != 0:
        message = load().lk_error_string(code).decode()
        raise RuntimeError(f"lens_kernels cuda backend: {what} failed: {message} (error {code})")


@functools.lru_cache(maxsize=None)
def _device_runs_kernels(index: int) -> bool:
    return load().lk_probe_device(index) == 0


def is_available(device: Optional[torch.device] = None) -> bool:
    """Whether the kernels can run on ``device`` (default: the current CUDA device): a CUDA
    device, the library built and loadable, a driver and an image (SASS or PTX) that fit."""
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or load_error() is not None:
        return False
    index = torch.cuda.current_device() if device.index is None else device.index
    return _device_runs_kernels(index)
