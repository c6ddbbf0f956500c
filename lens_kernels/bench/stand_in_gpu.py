"""A stand-in H100 for measuring host time without a GPU.

Everything a GPU launch does on the host runs for real except what the device itself does:
Triton's ``JITFunction.run`` (binder, specialization, cache lookup, launch metadata) compiles
each kernel for ``GPUTarget("cuda", 90, 32)`` with the installed ptxas and launches it through
its own generated C launcher (argument packing, ``data_ptr()`` calls), which is linked against a
**stub** ``libcuda.so.1`` whose every entry point returns ``CUDA_SUCCESS`` at once; the cuda
backend's ctypes calls go to a stub of ``liblens_kernels_cuda.so`` made from
:data:`lens_kernels.backends.cuda.library.SIGNATURES` (argument conversion is real, the kernels
return at once).  Tensors are CPU tensors (the kernels never read them).

CPU ``malloc`` stands for the CUDA caching allocator, set (``mallopt``) to keep freed blocks
in its heap instead of unmapping them, so that a ``[B, T, V]`` gradient buffer is reused from
call to call as the caching allocator's block would be (about 1 microsecond instead of ~30 for
an ``mmap``/``munmap`` pair with its TLB shootdown).

Not included: the CUDA driver's own launch latency (``cuLaunchKernelEx`` costs a few
microseconds on a real device), the caching allocator's own bookkeeping,
``torch.cuda.current_device`` / stream queries, and any device time.

Use in a process of its own, before anything launches a Triton kernel, and without
``TRITON_INTERPRET``: :func:`activate` swaps Triton's active driver for good.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

H100 = (9, 0)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters

# Every libcuda entry point that Triton's driver.c and launcher reference, returning CUDA_SUCCESS.
_LIBCUDA_STUB = r"""
#include <cuda.h>
#include <stdint.h>
static const char *stub_error = "stub libcuda (stand-in GPU)";
CUresult cuGetErrorString(CUresult e, const char **s) { *s = stub_error; return CUDA_SUCCESS; }
CUresult cuCtxGetCurrent(CUcontext *c) { *c = (CUcontext)1; return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(CUcontext c) { return CUDA_SUCCESS; }
CUresult cuCtxGetLimit(size_t *v, CUlimit l) { *v = 0; return CUDA_SUCCESS; }
CUresult cuCtxSetLimit(CUlimit l, size_t v) { return CUDA_SUCCESS; }
CUresult cuDeviceGet(CUdevice *d, int i) { *d = i; return CUDA_SUCCESS; }
CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) { *c = (CUcontext)1; return CUDA_SUCCESS; }
CUresult cuDeviceGetAttribute(int *v, CUdevice_attribute a, CUdevice d) {
  switch (a) {
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *v = 232448; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: *v = 233472; break;
    case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: *v = 65536; break;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *v = 132; break;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *v = 32; break;
    default: *v = 0;
  }
  return CUDA_SUCCESS;
}
CUresult cuModuleLoadData(CUmodule *m, const void *image) { *m = (CUmodule)1; return CUDA_SUCCESS; }
CUresult cuModuleGetFunction(CUfunction *f, CUmodule m, const char *n) { *f = (CUfunction)1; return CUDA_SUCCESS; }
CUresult cuFuncGetAttribute(int *v, CUfunction_attribute a, CUfunction f) {
  *v = a == CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK ? 1024 : 0;
  return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(CUfunction f, CUfunction_attribute a, int v) { return CUDA_SUCCESS; }
CUresult cuFuncSetCacheConfig(CUfunction f, CUfunc_cache c) { return CUDA_SUCCESS; }
CUresult cuLaunchKernelEx(const CUlaunchConfig *c, CUfunction f, void **p, void **e) { return CUDA_SUCCESS; }
CUresult cuOccupancyMaxActiveClusters(int *n, CUfunction f, const CUlaunchConfig *c) { *n = 1; return CUDA_SUCCESS; }
CUresult cuPointerGetAttribute(void *data, CUpointer_attribute a, CUdeviceptr p) {
  *(CUdeviceptr *)data = p;
  return CUDA_SUCCESS;
}
CUresult cuPointerGetAttributes(unsigned int n, CUpointer_attribute *a, void **data, CUdeviceptr p) {
  return CUDA_SUCCESS;
}
CUresult cuTensorMapEncodeTiled(CUtensorMap *m, CUtensorMapDataType t, cuuint32_t r, void *g, const cuuint64_t *d,
                                const cuuint64_t *s, const cuuint32_t *b, const cuuint32_t *e,
                                CUtensorMapInterleave i, CUtensorMapSwizzle w, CUtensorMapL2promotion l,
                                CUtensorMapFloatOOBfill o) { return CUDA_SUCCESS; }
"""


def _compile(source: str, out: Path, soname: str, include: list[str]) -> Path:
    src = out.with_suffix(".c")
    src.write_text(source)
    command = ["gcc", "-O2", "-shared", "-fPIC", f"-Wl,-soname,{soname}", *(f"-I{d}" for d in include),
               str(src), "-o", str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"stand-in GPU: cannot build {out.name}:\n{result.stderr[-2000:]}")
    return out


def _cuda_backend_stub() -> str:
    """C source of ``liblens_kernels_cuda.so`` with every exported function answering at once
    (the launchers' ctypes argument conversion still runs): success, and the ABI facts the
    loader checks."""
    from ..backends.cuda import library

    answers = {"lk_abi_version": str(library.ABI_VERSION),
               "lk_surrogate_config_size": str(ctypes.sizeof(library.SurrogateConfig)),
               "lk_error_string": '"stub"'}
    lines = []
    for name, (restype, _) in library.SIGNATURES.items():
        ctype = "const char *" if restype is ctypes.c_char_p else "long"
        # K&R-style empty parameter list: the callee ignores whatever ctypes passes (x86-64 SysV).
        lines.append(f'__attribute__((visibility("default"))) {ctype} {name}() {{ return {answers.get(name, "0")}; }}')
    return "\n".join(lines) + "\n"


def _stand_in_driver():
    """Triton's CUDA driver with the device queries answered for one H100 (device 0, stream 0)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class StandIn(CudaDriver):
        def __init__(self):
            super().__init__()  # builds Triton's cuda_utils module against the stub libcuda
            self.get_device_capability = lambda device=None: H100
            self.get_current_stream = lambda device=None: 0
            self.get_current_device = lambda: 0
            self.set_current_device = lambda device: None

        def get_current_target(self):
            return GPUTarget("cuda", H100[0] * 10 + H100[1], 32)

    return StandIn()


def activate(workdir: str | os.PathLike | None = None) -> Path:
    """Make this process launch through the stand-in H100 (for good); returns the folder of
    the stub libraries (a temporary one, removed at exit, unless ``workdir``).  Sets
    ``LENS_KERNELS_CUDA_LIBRARY`` to the stub cuda backend and makes both GPU backends report
    themselves available for CPU tensors."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("stand-in GPU: unset TRITON_INTERPRET (the interpreter never reaches the launch path)")
    import triton
    from triton import knobs
    from triton.runtime import driver

    from .. import backends
    from ..backends import cuda as cuda_backend
    from ..backends import triton as triton_backend
    from ..backends.cuda import library

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_MAX, 0)  # large blocks from the heap, freed blocks kept: no mmap/munmap per call
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 40)
    if workdir is None:
        folder = Path(tempfile.mkdtemp(prefix="lens-stand-in-gpu-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    else:
        folder = Path(workdir)
        folder.mkdir(parents=True, exist_ok=True)
    include = [str(Path(triton.__file__).parent / "backends" / "nvidia" / "include")]
    libcuda = _compile(_LIBCUDA_STUB, folder / "libcuda.so.1", "libcuda.so.1", include)
    ctypes.CDLL(str(libcuda), mode=ctypes.RTLD_GLOBAL)  # later dlopen("libcuda.so.1") finds this one
    knobs.nvidia.libcuda_path = str(folder)
    driver.set_active(_stand_in_driver())

    stub = _compile(_cuda_backend_stub(), folder / library.LIBRARY_FILE, library.LIBRARY_FILE, [])
    os.environ[library.LIBRARY_ENV] = str(stub)
    library.load.cache_clear()
    for module in (triton_backend, cuda_backend):
        module.is_available = lambda device=None: True
    assert backends.is_available("triton") and backends.is_available("cuda")
    return folder
