"""Build script of lens-kernels (metadata lives in pyproject.toml).

The package is pure Python plus, where a CUDA toolchain is found, the CUDA backend's shared
library, built from csrc/ by CMake (CMakeLists.txt) and installed as
lens_kernels/backends/cuda/_lib/liblens_kernels_cuda.so (into the source tree for editable
installs).  Environment:

    LENS_KERNELS_CUDA=auto  (default) build when nvcc and cmake are found; without them, or if
                            the build fails, install pure Python (the cuda backend then
                            reports itself unavailable)
    LENS_KERNELS_CUDA=1     build, and fail with a clear message when that is impossible
    LENS_KERNELS_CUDA=0     never build
    MAX_JOBS                parallel compile jobs (default: all cores)
    CUDACXX, CUDA_HOME, CUDA_PATH   where nvcc is looked for (then PATH, /usr/local/cuda)
    TORCH_CUDA_ARCH_LIST, CMAKE_CUDA_ARCHITECTURES, CUDAARCHS   GPU architectures (CMakeLists.txt)
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Mapping, NamedTuple, Optional

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent
EXTENSION = "lens_kernels.backends.cuda._lib.liblens_kernels_cuda"
LIBRARY_FILE = "liblens_kernels_cuda.so"
REQUESTS = ("auto", "1", "0")
DEFAULT_CUDA_HOME = "/usr/local/cuda"


class Toolchain(NamedTuple):
    nvcc: str
    cmake: str


def cuda_request(environ: Mapping[str, str]) -> str:
    """``LENS_KERNELS_CUDA`` as one of ``auto``, ``1``, ``0``."""
    value = environ.get("LENS_KERNELS_CUDA", "auto").strip().lower() or "auto"
    if value not in REQUESTS:
        raise SystemExit(f"LENS_KERNELS_CUDA: expected one of auto, 1, 0, got {value!r}")
    return value


def _executable(path: Optional[str]) -> Optional[str]:
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def find_nvcc(environ: Mapping[str, str]) -> Optional[str]:
    """nvcc from ``CUDACXX``, then ``PATH``, then ``$CUDA_HOME`` / ``$CUDA_PATH`` /
    /usr/local/cuda (the first of those that is set)."""
    cuda_home = environ.get("CUDA_HOME") or environ.get("CUDA_PATH") or DEFAULT_CUDA_HOME
    candidates = (
        environ.get("CUDACXX"),
        shutil.which("nvcc", path=environ.get("PATH", "")),
        os.path.join(cuda_home, "bin", "nvcc"),
    )
    return next((c for c in map(_executable, candidates) if c), None)


def find_toolchain(environ: Mapping[str, str]) -> tuple[Optional[Toolchain], str]:
    """``(toolchain, "")`` or ``(None, what is missing)``."""
    nvcc = find_nvcc(environ)
    cmake = _executable(shutil.which("cmake", path=environ.get("PATH", "")))
    missing = [name for name, found in (("nvcc", nvcc), ("cmake", cmake)) if not found]
    if missing:
        return None, " and ".join(missing) + " not found"
    return Toolchain(nvcc, cmake), ""


def plan_build(environ: Mapping[str, str]) -> Optional[Toolchain]:
    """The toolchain to build the CUDA library with, or None for a pure-Python install."""
    request = cuda_request(environ)
    if request == "0":
        return None
    toolchain, missing = find_toolchain(environ)
    if toolchain is None and request == "1":
        raise SystemExit(
            f"LENS_KERNELS_CUDA=1 asks for the CUDA backend, but {missing} (looked in CUDACXX, "
            f"PATH, CUDA_HOME/CUDA_PATH or {DEFAULT_CUDA_HOME}): install the CUDA toolkit and "
            "CMake >= 3.18, or set LENS_KERNELS_CUDA=auto/0 for a pure-Python install"
        )
    return toolchain


def build_library(toolchain: Toolchain, build_dir: Path, environ: Mapping[str, str]) -> Path:
    """Configure and build csrc/ with CMake in ``build_dir``; the built library's path."""
    configure = [
        toolchain.cmake, "-S", str(ROOT), "-B", str(build_dir),
        "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CUDA_COMPILER={toolchain.nvcc}",
    ]
    if environ.get("CMAKE_CUDA_ARCHITECTURES"):
        configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={environ['CMAKE_CUDA_ARCHITECTURES']}")
    jobs = environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
    subprocess.run(configure, check=True)
    subprocess.run([toolchain.cmake, "--build", str(build_dir), "-j", jobs], check=True)
    return build_dir / LIBRARY_FILE


class CMakeExtension(Extension):
    """The CUDA library: built by CMake, not by setuptools' compiler."""

    def __init__(self, toolchain: Toolchain, optional: bool):
        super().__init__(EXTENSION, sources=[], optional=optional)
        self.toolchain = toolchain


class BuildCuda(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        if fullname.split(".")[-1] == EXTENSION.split(".")[-1]:
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        target = Path(self.get_ext_fullpath(ext.name))
        target.unlink(missing_ok=True)  # a failed build must not ship a stale library
        try:
            built = build_library(ext.toolchain, Path(self.build_temp).resolve() / "csrc", os.environ)
        except (subprocess.CalledProcessError, OSError) as error:
            raise CompileError(f"building the CUDA library with CMake failed ({error})") from error
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)

    def copy_extensions_to_source(self) -> None:
        """Editable installs: the library's folder is not a package, so it may not exist yet."""
        package = EXTENSION.rpartition(".")[0]
        Path(self.get_finalized_command("build_py").get_package_dir(package)).mkdir(parents=True, exist_ok=True)
        super().copy_extensions_to_source()


def extensions() -> list[Extension]:
    toolchain = plan_build(os.environ)
    if toolchain is None:
        return []
    return [CMakeExtension(toolchain, optional=cuda_request(os.environ) == "auto")]


if __name__ == "__main__":
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildCuda})
