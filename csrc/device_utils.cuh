// Device helpers shared by the kernels: element conversions, 16-byte vector packing, warp and
// block reductions, and the launch-size rules.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lk {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- element conversions (fp32 arithmetic for every dtype) ----

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// ---- 16-byte vectors: kVec<T> elements packed in a uint4 ----

template <typename T>
constexpr int kVec = 16 / sizeof(T);

// Bits of one element <-> float, for the 32-bit words of a uint4.
template <typename T>
struct Bits;
template <>
struct Bits<float> {
  __device__ static void unpack(uint32_t w, float* out) { out[0] = __uint_as_float(w); }
  __device__ static uint32_t pack(const float* in) { return __float_as_uint(in[0]); }
};
template <>
struct Bits<__nv_bfloat16> {
  __device__ static void unpack(uint32_t w, float* out) {
    out[0] = __uint_as_float(w << 16);
    out[1] = __uint_as_float(w & 0xffff0000u);
  }
  __device__ static uint32_t pack(const float* in) {
    const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(in[0]));
    const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(in[1]));
    return lo | (hi << 16);
  }
};
template <>
struct Bits<__half> {
  __device__ static void unpack(uint32_t w, float* out) {
    out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  __device__ static uint32_t pack(const float* in) {
    const uint32_t lo = __half_as_ushort(__float2half_rn(in[0]));
    const uint32_t hi = __half_as_ushort(__float2half_rn(in[1]));
    return lo | (hi << 16);
  }
};

// Streaming (evict-first) 16-byte load of kVec<T> elements, converted to float.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  constexpr int per_word = kVec<T> / 4;
  const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p));
  Bits<T>::unpack(u.x, out);
  Bits<T>::unpack(u.y, out + per_word);
  Bits<T>::unpack(u.z, out + 2 * per_word);
  Bits<T>::unpack(u.w, out + 3 * per_word);
}

// Streaming 16-byte store of kVec<T> floats converted to T.
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float* in) {
  constexpr int per_word = kVec<T> / 4;
  uint4 u;
  u.x = Bits<T>::pack(in);
  u.y = Bits<T>::pack(in + per_word);
  u.z = Bits<T>::pack(in + 2 * per_word);
  u.w = Bits<T>::pack(in + 3 * per_word);
  __stcs(reinterpret_cast<uint4*>(p), u);
}

// Elements before the first 16-byte boundary of a row starting at p (all V when p is not even
// element-aligned, which disables the vector path).
template <typename T>
__device__ __forceinline__ int64_t head_to_alignment(const void* p, int64_t vocab) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  if (addr % sizeof(T) != 0) return vocab;
  const int64_t head = static_cast<int64_t>((16 - (addr & 15)) & 15) / static_cast<int64_t>(sizeof(T));
  return head < vocab ? head : vocab;
}

// ---- reductions (blockDim.x must be a multiple of 32, at most 1024) ----

struct SumOp {
  template <typename V>
  __device__ V operator()(V a, V b) const { return a + b; }
};
// NaN-propagating maximum (as torch.max).
struct MaxOp {
  template <typename V>
  __device__ V operator()(V a, V b) const { return (a > b || a != a) ? a : b; }
};

__device__ __forceinline__ float shfl_xor(float x, int offset) { return __shfl_xor_sync(kFullMask, x, offset); }
__device__ __forceinline__ double shfl_xor(double x, int offset) { return __shfl_xor_sync(kFullMask, x, offset); }

// Butterfly reduction over a full warp (shfl_xor overloads for other types are found by ADL).
template <typename V, typename Op>
__device__ __forceinline__ V warp_reduce(V x, Op op) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) x = op(x, shfl_xor(x, offset));
  return x;
}

// Reduce one value per thread over the block; every thread gets the result.  Safe to call
// repeatedly (the leading barrier protects the scratch of the previous call).
template <typename V, typename Op>
__device__ V block_reduce(V x, Op op, V identity) {
  __shared__ V scratch[kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  x = warp_reduce(x, op);
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < num_warps ? scratch[lane] : identity;
    x = warp_reduce(x, op);
    if (lane == 0) scratch[0] = x;
  }
  __syncthreads();
  return scratch[0];
}

// ---- launch sizes ----

// Threads per block for a block that loops over `items` work items: enough for about four
// items each, between 64 and kMaxThreads (always a multiple of 32).
inline int block_threads(int64_t items) {
  int threads = 64;
  while (threads < kMaxThreads && threads * 4 < items) threads *= 2;
  return threads;
}

// Blocks for a grid-stride loop over `rows` rows, one row per block at a time.
inline unsigned row_blocks(int64_t rows) {
  constexpr int64_t kMaxBlocks = 0x7fffffff;
  return static_cast<unsigned>(rows < kMaxBlocks ? rows : kMaxBlocks);
}

}  // namespace lk
