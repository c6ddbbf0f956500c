// One row of the vocabulary in a thread block: the online logsumexp (each thread keeps a
// running max and a sum of exponentials, merged by warp shuffles and then across warps) and the
// gradient row ``scale * (onehot - exp(z - lse))``.  Shared by the vocabulary pass
// (logprobs.cu) and the one-pass loss (fused_loss.cu).  Rows with stride_v == 1 are read (and
// written) with 16-byte vectors from their first 16-byte boundary on, with scalar head and
// tail elements; other rows use scalar accesses.  All offsets are 64-bit; arithmetic is fp32.
#pragma once

#include <cmath>

#include "device_utils.cuh"
#include "lens_kernels_cuda.h"

// Instantiates `call` (which names the element type T) for a LK_FLOAT32/BFLOAT16/FLOAT16 code.
#define LK_DISPATCH(dtype, call)                                \
  switch (dtype) {                                              \
    case LK_FLOAT32: { using T = float; return call; }          \
    case LK_BFLOAT16: { using T = __nv_bfloat16; return call; } \
    case LK_FLOAT16: { using T = __half; return call; }         \
    default: return LK_ERROR_DTYPE;                             \
  }

namespace lk {

inline bool bad_sizes(int64_t batch, int64_t length, int64_t vocab) { return batch < 0 || length < 0 || vocab < 1; }

// Threads of a block that sweeps one row of `vocab` elements of type T (about four 16-byte
// vectors per thread).
template <typename T>
inline int row_threads(int64_t vocab) {
  return block_threads((vocab * static_cast<int64_t>(sizeof(T)) + 15) / 16);
}

constexpr int kUnroll = 4;  // independent 16-byte loads in flight per thread

// Running logsumexp of a set of values: max m and s = sum exp(z - m).  m == -inf means every
// value so far was -inf (s is then 0, or NaN when a NaN was seen).
struct Lse {
  float m;
  float s;
};

__device__ __forceinline__ Lse shfl_xor(Lse x, int offset) {
  return {__shfl_xor_sync(kFullMask, x.m, offset), __shfl_xor_sync(kFullMask, x.s, offset)};
}

struct LseMerge {
  __device__ Lse operator()(Lse a, Lse b) const {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return {m, a.s + b.s};
    return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
  }
};

__device__ __forceinline__ void lse_add(Lse& acc, float z) {
  if (z > acc.m) {
    acc.s = acc.s * expf(acc.m - z) + 1.f;
    acc.m = z;
  } else if (z != -INFINITY) {
    acc.s += expf(z - acc.m);  // NaN z lands here and poisons s
  }
}

// Adds N values with one rescale (fmaxf skips NaN; expf(NaN - m) then poisons the sum).
template <int N>
__device__ __forceinline__ void lse_add_chunk(Lse& acc, const float* z) {
  float chunk_max = z[0];
#pragma unroll
  for (int i = 1; i < N; ++i) chunk_max = fmaxf(chunk_max, z[i]);
  if (chunk_max > acc.m) {
    acc.s *= expf(acc.m - chunk_max);
    acc.m = chunk_max;
  }
  if (acc.m == -INFINITY) {  // only -inf and NaN so far: keep the NaN, add nothing
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (z[i] != z[i]) acc.s = z[i];
    return;
  }
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) sum += expf(z[i] - acc.m);
  acc.s += sum;
}

// This thread's share of the logsumexp of z = x * inv_t over one row.
template <typename T>
__device__ Lse thread_lse(const T* x, int64_t vocab, int64_t stride_v, float inv_t) {
  constexpr int kV = kVec<T>;
  Lse acc{-INFINITY, 0.f};
  const int64_t step = blockDim.x;
  const int64_t head = stride_v == 1 ? head_to_alignment<T>(x, vocab) : vocab;
  for (int64_t v = threadIdx.x; v < head; v += step) lse_add(acc, to_float(x[v * stride_v]) * inv_t);
  if (head == vocab) return acc;

  const T* body = x + head;
  const int64_t num_vec = (vocab - head) / kV;
  int64_t i = threadIdx.x;
  for (; i + (kUnroll - 1) * step < num_vec; i += kUnroll * step) {
    float z[kUnroll * kV];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load_vec(body + (i + u * step) * kV, z + u * kV);
#pragma unroll
    for (int j = 0; j < kUnroll * kV; ++j) z[j] *= inv_t;
    lse_add_chunk<kUnroll * kV>(acc, z);
  }
  for (; i < num_vec; i += step) {
    float z[kV];
    load_vec(body + i * kV, z);
#pragma unroll
    for (int j = 0; j < kV; ++j) z[j] *= inv_t;
    lse_add_chunk<kV>(acc, z);
  }
  for (int64_t v = head + num_vec * kV + threadIdx.x; v < vocab; v += step) lse_add(acc, to_float(x[v]) * inv_t);
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    logprobs_forward_kernel(const T* __restrict__ logits, const int64_t* __restrict__ target,
                            float* __restrict__ logp, float* __restrict__ lse, int64_t rows,
                            int64_t length, int64_t vocab, int64_t stride_b, int64_t stride_t,
                            int64_t stride_v, float inv_t) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / length;
    const T* x = logits + b * stride_b + (row - b * length) * stride_t;
    float z_target = NAN;  // an id outside [0, V) (never passed by lens_kernels) gives NaN
    if (threadIdx.x == 0) {
      const int64_t y = target[row];
      if (y >= 0 && y < vocab) z_target = to_float(x[y * stride_v]) * inv_t;
    }
    const Lse acc = block_reduce(thread_lse(x, vocab, stride_v, inv_t), LseMerge{}, Lse{-INFINITY, 0.f});
    if (threadIdx.x == 0) {
      const float row_lse = acc.m + logf(acc.s);
      lse[row] = row_lse;
      logp[row] = z_target - row_lse;
    }
  }
}

// out[v] = scale * (1[v == target] - exp(x[v] * inv_t - lse)) for this thread's elements of
// one row.  x and out may be the same row (in place): each element is read, then written, by
// the same thread.  1 - p is exact in fp32 for p >= 1/2, so the target's gradient keeps the
// precision of p.
template <typename T>
__device__ void thread_grad_row(const T* x, T* out, int64_t vocab, int64_t stride_v, int64_t out_stride_v,
                                int64_t target, float scale, float inv_t, float row_lse) {
  constexpr int kV = kVec<T>;
  const int64_t step = blockDim.x;
  const auto grad = [=](float logit, int64_t v) {
    return scale * ((v == target ? 1.f : 0.f) - expf(logit * inv_t - row_lse));
  };
  const bool same_alignment = (reinterpret_cast<uintptr_t>(x) & 15) == (reinterpret_cast<uintptr_t>(out) & 15);
  const int64_t head = (stride_v == 1 && out_stride_v == 1 && same_alignment) ? head_to_alignment<T>(x, vocab) : vocab;
  for (int64_t v = threadIdx.x; v < head; v += step)
    out[v * out_stride_v] = from_float<T>(grad(to_float(x[v * stride_v]), v));
  if (head == vocab) return;

  const T* body = x + head;
  T* out_body = out + head;
  const int64_t num_vec = (vocab - head) / kV;
  int64_t i = threadIdx.x;
  for (; i + (kUnroll - 1) * step < num_vec; i += kUnroll * step) {
    float z[kUnroll * kV];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load_vec(body + (i + u * step) * kV, z + u * kV);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < kV; ++j) z[u * kV + j] = grad(z[u * kV + j], head + (i + u * step) * kV + j);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) store_vec(out_body + (i + u * step) * kV, z + u * kV);
  }
  for (; i < num_vec; i += step) {
    float z[kV];
    load_vec(body + i * kV, z);
#pragma unroll
    for (int j = 0; j < kV; ++j) z[j] = grad(z[j], head + i * kV + j);
    store_vec(out_body + i * kV, z);
  }
  for (int64_t v = head + num_vec * kV + threadIdx.x; v < vocab; v += step) out[v] = from_float<T>(grad(to_float(x[v]), v));
}

template <typename T>
__device__ void thread_zero_row(T* out, int64_t vocab, int64_t out_stride_v) {
  constexpr int kV = kVec<T>;
  const int64_t step = blockDim.x;
  const int64_t head = out_stride_v == 1 ? head_to_alignment<T>(out, vocab) : vocab;
  for (int64_t v = threadIdx.x; v < head; v += step) out[v * out_stride_v] = from_float<T>(0.f);
  if (head == vocab) return;
  const float zeros[kV] = {};
  const int64_t num_vec = (vocab - head) / kV;
  for (int64_t i = threadIdx.x; i < num_vec; i += step) store_vec(out + head + i * kV, zeros);
  for (int64_t v = head + num_vec * kV + threadIdx.x; v < vocab; v += step) out[v] = from_float<T>(0.f);
}


// This block's logsumexp of one row, and (thread 0 only) the target's scaled logit; every
// thread gets the logsumexp.  An id outside [0, V) gives a NaN target logit.
template <typename T>
__device__ float row_lse(const T* x, int64_t vocab, int64_t stride_v, float inv_t, int64_t target, float& z_target) {
  z_target = NAN;
  if (threadIdx.x == 0 && target >= 0 && target < vocab) z_target = to_float(x[target * stride_v]) * inv_t;
  const Lse acc = block_reduce(thread_lse(x, vocab, stride_v, inv_t), LseMerge{}, Lse{-INFINITY, 0.f});
  return acc.m + logf(acc.s);
}

// Writes this thread's share of one gradient row: zeros without reading the logits when
// scale == 0 (padding, zero-advantage rows, clipped tokens), else scale * (onehot - p).
template <typename T>
__device__ void thread_write_grad(const T* x, T* out, int64_t vocab, int64_t stride_v, int64_t out_stride_v,
                                  int64_t target, float scale, float inv_t, float lse) {
  if (scale == 0.f) {
    thread_zero_row(out, vocab, out_stride_v);
  } else {
    thread_grad_row(x, out, vocab, stride_v, out_stride_v, target, scale, inv_t, lse);
  }
}

}  // namespace lk
