// One row of the vocabulary in a thread block: the online logsumexp (each thread keeps a
// running max and a sum of exponentials, and for the entropy a sum of exp(z - m) (z - m), merged
// by warp shuffles and then across warps) and the gradient row
// coef * (onehot - p) - coef_h * p * (log p + ent).  Logits are scaled by 1 / t as Scale does.
// Shared by the vocabulary pass (logprobs.cu) and the one-pass loss (fused_loss.cu).  Rows with stride_v == 1 are read (and
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

// x / t in fp32 without a one-sided bias (lens_kernels.config.split_float): fma(x, hi, x * lo),
// or x * hi when 1 / t has no low part (then exact, and an infinite x never meets inf * 0).
struct Scale {
  float hi, lo;
  __device__ __forceinline__ float operator()(float x) const { return lo == 0.f ? x * hi : fmaf(x, hi, x * lo); }
  // The gradients' factor 1 / t: hi + lo rounded to fp32 (hi alone keeps 12 bits).
  __device__ __forceinline__ float inv_t() const { return hi + lo; }
};

// Running statistics of a set of values z: max m, s = sum exp(z - m) and, with kEntropy,
// u = sum exp(z - m) (z - m) (the entropy of softmax(z) is log s - u / s: no cancellation of
// two large numbers).  m == -inf means every value so far was -inf (s and u are then 0, or s
// NaN when a NaN was seen).  Without kEntropy, u stays 0 and costs nothing.
template <bool kEntropy>
struct Stats {
  float m;
  float s;
  float u;
};

template <bool kEntropy>
__device__ __forceinline__ Stats<kEntropy> shfl_xor(Stats<kEntropy> x, int offset) {
  Stats<kEntropy> out{__shfl_xor_sync(kFullMask, x.m, offset), __shfl_xor_sync(kFullMask, x.s, offset), 0.f};
  if constexpr (kEntropy) out.u = __shfl_xor_sync(kFullMask, x.u, offset);
  return out;
}

// x.u measured from a max m >= x.m, given scale = exp(x.m - m): scale (x.u + (x.m - m) x.s);
// x.s == 0 (nothing but -inf so far) contributes x.u = 0, never (-inf) * 0.
template <bool kEntropy>
__device__ __forceinline__ float moved_u(const Stats<kEntropy>& x, float m, float scale) {
  return x.s > 0.f ? scale * (x.u + (x.m - m) * x.s) : x.u;
}

template <bool kEntropy>
struct StatsMerge {
  __device__ Stats<kEntropy> operator()(Stats<kEntropy> a, Stats<kEntropy> b) const {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return {m, a.s + b.s, a.u + b.u};
    const float scale_a = expf(a.m - m), scale_b = expf(b.m - m);
    Stats<kEntropy> out{m, a.s * scale_a + b.s * scale_b, 0.f};
    if constexpr (kEntropy) out.u = moved_u(a, m, scale_a) + moved_u(b, m, scale_b);
    return out;
  }
};

template <bool kEntropy>
__device__ __forceinline__ void stats_add(Stats<kEntropy>& acc, float z) {
  if (z > acc.m) {
    const float scale = expf(acc.m - z);
    if constexpr (kEntropy) acc.u = moved_u(acc, z, scale);  // z's own term is 1 * 0
    acc.s = acc.s * scale + 1.f;
    acc.m = z;
  } else if (z != -INFINITY) {
    const float e = expf(z - acc.m);  // NaN z lands here and poisons s
    acc.s += e;
    if constexpr (kEntropy) acc.u += e > 0.f ? e * (z - acc.m) : 0.f;
  }
}

// Adds N values with one rescale (fmaxf skips NaN; expf(NaN - m) then poisons the sum).
template <int N, bool kEntropy>
__device__ __forceinline__ void stats_add_chunk(Stats<kEntropy>& acc, const float* z) {
  float chunk_max = z[0];
#pragma unroll
  for (int i = 1; i < N; ++i) chunk_max = fmaxf(chunk_max, z[i]);
  if (chunk_max > acc.m) {
    const float scale = expf(acc.m - chunk_max);
    if constexpr (kEntropy) acc.u = moved_u(acc, chunk_max, scale);
    acc.s *= scale;
    acc.m = chunk_max;
  }
  if (acc.m == -INFINITY) {  // only -inf and NaN so far: keep the NaN, add nothing
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (z[i] != z[i]) acc.s = z[i];
    return;
  }
  float sum = 0.f, u_sum = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float e = expf(z[i] - acc.m);
    sum += e;
    if constexpr (kEntropy) u_sum += e > 0.f ? e * (z[i] - acc.m) : 0.f;  // a -inf logit adds 0
  }
  acc.s += sum;
  if constexpr (kEntropy) acc.u += u_sum;
}

// This thread's share of the statistics of z = x / t over one row.
template <typename T, bool kEntropy>
__device__ Stats<kEntropy> thread_stats(const T* x, int64_t vocab, int64_t stride_v, Scale scale) {
  constexpr int kV = kVec<T>;
  Stats<kEntropy> acc{-INFINITY, 0.f, 0.f};
  const int64_t step = blockDim.x;
  const int64_t head = stride_v == 1 ? head_to_alignment<T>(x, vocab) : vocab;
  for (int64_t v = threadIdx.x; v < head; v += step) stats_add(acc, scale(to_float(x[v * stride_v])));
  if (head == vocab) return acc;

  const T* body = x + head;
  const int64_t num_vec = (vocab - head) / kV;
  int64_t i = threadIdx.x;
  for (; i + (kUnroll - 1) * step < num_vec; i += kUnroll * step) {
    float z[kUnroll * kV];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load_vec(body + (i + u * step) * kV, z + u * kV);
#pragma unroll
    for (int j = 0; j < kUnroll * kV; ++j) z[j] = scale(z[j]);
    stats_add_chunk<kUnroll * kV>(acc, z);
  }
  for (; i < num_vec; i += step) {
    float z[kV];
    load_vec(body + i * kV, z);
#pragma unroll
    for (int j = 0; j < kV; ++j) z[j] = scale(z[j]);
    stats_add_chunk<kV>(acc, z);
  }
  for (int64_t v = head + num_vec * kV + threadIdx.x; v < vocab; v += step) stats_add(acc, scale(to_float(x[v])));
  return acc;
}

// A logsumexp in two parts, hi + lo: the row's max m and log s in the one-pass loss (so that
// log p = (z - m) - log s keeps a near-certain token's precision), a saved double lse split.
struct LogSumExp {
  float hi;
  float lo;
  // A saved double logsumexp as fp32 parts (hi its nearest fp32, lo the rest).
  __device__ static LogSumExp split(double lse) {
    const float hi = static_cast<float>(lse);
    return {hi, static_cast<float>(lse - static_cast<double>(hi))};
  }
};

// out[v] = coef * (1[v == target] - p_v) - coef_h * p_v * (log p_v + ent), p = exp(x / t - lse),
// for this thread's elements of one row (coef, coef_h: d loss / d logp and d loss / d ent times
// 1 / t; the entropy term only with kEntropy, and p_v = 0 adds exactly 0).  x and out may be
// the same row (in place): each element is read, then written, by the same thread.  1 - p is
// exact in fp32 for p >= 1/2, so the target's gradient keeps the precision of p.
template <typename T, bool kEntropy>
__device__ void thread_grad_row(const T* x, T* out, int64_t vocab, int64_t stride_v, int64_t out_stride_v,
                                int64_t target, float coef, float coef_h, Scale scale, LogSumExp lse, float ent) {
  constexpr int kV = kVec<T>;
  const int64_t step = blockDim.x;
  const auto grad = [=](float logit, int64_t v) {
    const float log_p = (scale(logit) - lse.hi) - lse.lo;
    const float p = expf(log_p);
    if constexpr (kEntropy) {
      return (v == target ? coef : 0.f) - (p > 0.f ? p * (coef + coef_h * (log_p + ent)) : 0.f);
    } else {
      return coef * ((v == target ? 1.f : 0.f) - p);
    }
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


// The logsumexp of one row, as its max m and log s (lse = m + log s), and with kEntropy the
// entropy of its softmax (0 without).
struct RowStats {
  float m;
  float log_s;
  float ent;
  __device__ float lse() const { return m + log_s; }
  // log p of a scaled logit z, to the precision of log p (z - lse would round to lse's last place).
  __device__ float log_p(float z) const { return (z - m) - log_s; }
};

// This block's statistics of one row (every thread gets them) and (thread 0 only) the target's
// scaled logit.  An id outside [0, V) gives a NaN target logit.
template <typename T, bool kEntropy>
__device__ RowStats row_stats(const T* x, int64_t vocab, int64_t stride_v, Scale scale, int64_t target,
                              float& z_target) {
  z_target = NAN;
  if (threadIdx.x == 0 && target >= 0 && target < vocab) z_target = scale(to_float(x[target * stride_v]));
  const Stats<kEntropy> acc = block_reduce(thread_stats<T, kEntropy>(x, vocab, stride_v, scale),
                                           StatsMerge<kEntropy>{}, Stats<kEntropy>{-INFINITY, 0.f, 0.f});
  const float log_s = logf(acc.s);
  return {acc.m, log_s, kEntropy ? log_s - acc.u / acc.s : 0.f};
}

// Writes this thread's share of one gradient row: zeros without reading the logits when every
// coefficient is 0 (padding, zero-advantage rows, clipped tokens), else thread_grad_row.
template <typename T, bool kEntropy>
__device__ void thread_write_grad(const T* x, T* out, int64_t vocab, int64_t stride_v, int64_t out_stride_v,
                                  int64_t target, float coef, float coef_h, Scale scale, LogSumExp lse, float ent) {
  if (coef == 0.f && (!kEntropy || coef_h == 0.f)) {
    thread_zero_row(out, vocab, out_stride_v);
  } else {
    thread_grad_row<T, kEntropy>(x, out, vocab, stride_v, out_stride_v, target, coef, coef_h, scale, lse, ent);
  }
}

}  // namespace lk
