// Library metadata, error strings and the device probe of the C ABI.
#include "device_utils.cuh"
#include "lens_kernels_cuda.h"

namespace {

__global__ void probe_kernel() {}

}  // namespace

extern "C" int lk_abi_version(void) { return LK_ABI_VERSION; }

extern "C" size_t lk_surrogate_config_size(void) { return sizeof(lk_surrogate_config); }

extern "C" const char* lk_error_string(int code) {
  switch (code) {
    case LK_ERROR_DTYPE:
      return "unsupported dtype code (expected float32, bfloat16 or float16)";
    case LK_ERROR_ARGUMENT:
      return "invalid argument (negative size, empty vocabulary, unknown option or null pointer)";
    default:
      return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}

// Loading a kernel's attributes fails when the driver is older than this library's runtime or
// when no SASS/PTX image fits the device, which is what a launch would hit.
extern "C" int lk_probe_device(int device) {
  int previous = 0;
  cudaError_t err = cudaGetDevice(&previous);
  if (err != cudaSuccess) return static_cast<int>(err);
  err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  cudaFuncAttributes attributes;
  err = cudaFuncGetAttributes(&attributes, probe_kernel);
  const cudaError_t restore = cudaSetDevice(previous);
  return static_cast<int>(err != cudaSuccess ? err : restore);
}
