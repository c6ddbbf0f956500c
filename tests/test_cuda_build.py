"""The CUDA backend's build, checked on the CPU: the built library's symbol table and ABI
against the ctypes loader, setup.py's toolchain detection, and CMake's architecture choice."""
from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lens_kernels.backends.cuda import library

ROOT = Path(__file__).resolve().parents[1]
BUILT = (library.library_path(), ROOT / "build" / "csrc" / library.LIBRARY_FILE)


def built_library() -> Path:
    found = next((path for path in BUILT if path.is_file()), None)
    if found is None:
        pytest.skip(f"{library.LIBRARY_FILE} not built (looked at {', '.join(map(str, BUILT))})")
    return found


def test_exported_symbols_are_the_loader_signatures():
    if shutil.which("nm") is None:
        pytest.skip("nm not found")
    table = subprocess.run(["nm", "-D", "--defined-only", str(built_library())],
                           capture_output=True, text=True, check=True).stdout
    functions = {fields[2] for fields in map(str.split, table.splitlines()) if len(fields) == 3 and fields[1] == "T"}
    assert functions == set(library.SIGNATURES), (
        f"exported but not in SIGNATURES: {sorted(functions - set(library.SIGNATURES))}; "
        f"in SIGNATURES but not exported: {sorted(set(library.SIGNATURES) - functions)}"
    )


def test_header_declares_the_loader_signatures():
    header = (ROOT / "csrc" / "lens_kernels_cuda.h").read_text()
    declared = set(re.findall(r"LK_EXPORT [^(]*?\b(lk_\w+)\(", header))
    assert declared == set(library.SIGNATURES)
    for name, value in {"LK_ABI_VERSION": library.ABI_VERSION}.items():
        assert re.search(rf"#define {name} {value}\b", header), name
    for dtype, code in library.DTYPES.items():
        suffix = {torch.float32: "FLOAT32", torch.bfloat16: "BFLOAT16", torch.float16: "FLOAT16"}[dtype]
        assert re.search(rf"LK_{suffix} = {code}\b", header), suffix
    fields = re.search(r"typedef struct \{(.*?)\} lk_surrogate_config;", header, re.S).group(1)
    declared_fields = re.findall(r"(?:int32_t|double) (\w+);", fields)
    assert declared_fields == [name for name, _ in library.SurrogateConfig._fields_]


def test_library_loads_and_reports_no_device_without_a_gpu(monkeypatch):
    monkeypatch.setenv(library.LIBRARY_ENV, str(built_library()))
    library.load.cache_clear()
    try:
        lib = library.load()  # checks ABI version and lk_surrogate_config's size
        assert lib.lk_surrogate_config_size() == ctypes.sizeof(library.SurrogateConfig)
        assert b"dtype" in lib.lk_error_string(-1)
        assert not library.is_available(torch.device("cpu"))
        with pytest.raises(RuntimeError, match="unsupported dtype"):
            library.check(-1, "a launch")
        if not torch.cuda.is_available():
            assert lib.lk_probe_device(0) != 0
            sizes = (1, 1, 1, 1, 1, 1)  # rejected before any launch: no pointer is dereferenced
            args = (8, 1, 1, None, 0, 0, 1.0, 0.0, 8, 8, None, None)
            assert lib.lk_logprobs_forward(8, 7, *sizes, *args) == -1  # LK_ERROR_DTYPE
            assert lib.lk_logprobs_forward(None, 0, *sizes, *args) == -2  # LK_ERROR_ARGUMENT
    finally:
        library.load.cache_clear()


def test_missing_library_means_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv(library.LIBRARY_ENV, str(tmp_path / library.LIBRARY_FILE))
    library.load.cache_clear()
    try:
        assert "not found" in library.load_error()
        assert not library.is_available(torch.device("cuda"))
    finally:
        library.load.cache_clear()


# ---------------------------------------------------------------------------------------------
# setup.py


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("lens_kernels_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only as __main__
    return module


def fake_tools(directory: Path, *names: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        tool = directory / name
        tool.write_text("#!/bin/sh\nexit 0\n")
        tool.chmod(0o755)
    return directory


def environment(tmp_path: Path, request: str | None, path: Path, **extra) -> dict:
    env = {"PATH": str(path), "CUDA_HOME": str(tmp_path / "no-cuda"), **extra}
    if request is not None:
        env["LENS_KERNELS_CUDA"] = request
    return env


def test_setup_zero_never_builds(setup_py, tmp_path):
    tools = fake_tools(tmp_path / "bin", "nvcc", "cmake")
    assert setup_py.plan_build(environment(tmp_path, "0", tools)) is None


@pytest.mark.parametrize("request_value", ["auto", None, "AUTO", "1"])
def test_setup_builds_with_a_toolchain(setup_py, tmp_path, request_value):
    tools = fake_tools(tmp_path / "bin", "nvcc", "cmake")
    toolchain = setup_py.plan_build(environment(tmp_path, request_value, tools))
    assert toolchain == setup_py.Toolchain(str(tools / "nvcc"), str(tools / "cmake"))


def test_setup_auto_without_toolchain_is_pure_python(setup_py, tmp_path):
    only_cmake = fake_tools(tmp_path / "bin", "cmake")
    assert setup_py.plan_build(environment(tmp_path, "auto", only_cmake)) is None
    only_nvcc = fake_tools(tmp_path / "cuda" / "bin", "nvcc")
    assert setup_py.plan_build(environment(tmp_path, "auto", only_nvcc)) is None


def test_setup_one_without_toolchain_fails_clearly(setup_py, tmp_path):
    only_cmake = fake_tools(tmp_path / "bin", "cmake")
    with pytest.raises(SystemExit, match=r"LENS_KERNELS_CUDA=1 .* nvcc not found"):
        setup_py.plan_build(environment(tmp_path, "1", only_cmake))


def test_setup_rejects_unknown_request(setup_py, tmp_path):
    with pytest.raises(SystemExit, match="expected one of auto, 1, 0"):
        setup_py.plan_build(environment(tmp_path, "yes", tmp_path))


def test_setup_nvcc_search_order(setup_py, tmp_path):
    cmake_dir = fake_tools(tmp_path / "bin", "cmake")
    home = fake_tools(tmp_path / "cuda" / "bin", "nvcc").parent
    explicit = fake_tools(tmp_path / "explicit", "nvcc") / "nvcc"
    env = environment(tmp_path, "auto", cmake_dir, CUDA_HOME=str(home))
    assert setup_py.plan_build(env).nvcc == str(home / "bin" / "nvcc")
    env["CUDACXX"] = str(explicit)
    assert setup_py.plan_build(env).nvcc == str(explicit)


# ---------------------------------------------------------------------------------------------
# CMake architecture choice (configure only)


def configure(tmp_path: Path, **env) -> str:
    cmake, nvcc = shutil.which("cmake"), os.environ.get("CUDACXX") or shutil.which("nvcc")
    if cmake is None or nvcc is None:
        pytest.skip("cmake or nvcc not found")
    environ = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "CUDAARCHS")}
    result = subprocess.run(
        [cmake, "-S", str(ROOT), "-B", str(tmp_path / "build"), f"-DCMAKE_CUDA_COMPILER={nvcc}"],
        capture_output=True, text=True, env={**environ, **env},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def offered_archs() -> str:
    return subprocess.run([shutil.which("nvcc"), "--list-gpu-arch"], capture_output=True, text=True).stdout


def test_cmake_default_architectures(tmp_path):
    assert "architectures 80;90\n" in configure(tmp_path)


def test_cmake_torch_arch_list(tmp_path):
    output = configure(tmp_path, TORCH_CUDA_ARCH_LIST="7.0 8.0;8.6 9.0+PTX")
    expected = ["80-real", "86-real", "90"]
    if "compute_70" in offered_archs():
        expected.insert(0, "70-real")
    else:
        assert "cannot build sm_70: left out" in output
    assert f"architectures {';'.join(expected)}\n" in output
