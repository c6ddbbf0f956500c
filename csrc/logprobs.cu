// The vocabulary pass (SPEC step 1, and the entropy of the softmax) and its backward: one thread
// block per (b, t) row.
//
// Forward: the online logsumexp of the row (with the entropy's sum when asked for) plus the
// target logit (vocab_row.cuh), so a row is read exactly once; rows whose completion mask is 0
// are not read (logp = lse = ent = 0).  lse = m + log s is stored in double (both fp32 parts
// exactly).  Backward: grad = (grad_logp * (onehot - p) - grad_ent * p * (log p + ent)) *
// grad_scale / t, recomputing the softmax from the saved lse split into fp32 parts (the entropy
// term only when grad_entropy is given: otherwise the log-prob kernel alone); rows whose
// coefficients are 0 get zeros without reading the logits.
#include <cmath>

#include "lens_kernels_cuda.h"
#include "vocab_row.cuh"

namespace lk {
namespace {

template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kMaxThreads)
    logprobs_forward_kernel(const T* __restrict__ logits, const int64_t* __restrict__ target,
                            const uint8_t* __restrict__ live, float* __restrict__ logp, double* __restrict__ lse,
                            float* __restrict__ ent, int64_t rows, int64_t length, int64_t vocab, int64_t stride_b,
                            int64_t stride_t, int64_t stride_v, int64_t target_stride_b, int64_t target_stride_t,
                            int64_t live_stride_b, int64_t live_stride_t, Scale scale) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / length;
    const int64_t t = row - b * length;
    if (live != nullptr && live[b * live_stride_b + t * live_stride_t] == 0) {
      if (threadIdx.x == 0) {
        logp[row] = 0.f;
        lse[row] = 0.0;
        if constexpr (kEntropy) ent[row] = 0.f;
      }
      continue;
    }
    const T* x = logits + b * stride_b + t * stride_t;
    float z_target;
    const RowStats stats = row_stats<T, kEntropy>(x, vocab, stride_v, scale,
                                                  target[b * target_stride_b + t * target_stride_t], z_target);
    if (threadIdx.x == 0) {
      lse[row] = static_cast<double>(stats.m) + static_cast<double>(stats.log_s);  // both parts, exactly
      logp[row] = stats.log_p(z_target);
      if constexpr (kEntropy) ent[row] = stats.ent;
    }
  }
}

// No __restrict__ on logits / grad: they are the same storage for the in-place backward.
template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kMaxThreads)
    logprobs_backward_kernel(const float* __restrict__ grad_logp, const float* __restrict__ grad_scale,
                             const float* __restrict__ grad_ent, const float* __restrict__ ent, const T* logits,
                             const int64_t* __restrict__ target, const double* __restrict__ lse, T* grad,
                             int64_t rows, int64_t length, int64_t vocab, int64_t stride_b, int64_t stride_t,
                             int64_t stride_v, int64_t target_stride_b, int64_t target_stride_t,
                             int64_t grad_stride_b, int64_t grad_stride_t, int64_t grad_stride_v, Scale scale) {
  const float factor = (grad_scale == nullptr ? 1.f : *grad_scale) * scale.inv_t();
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / length;
    const int64_t t = row - b * length;
    // The same values in every thread: the branches below are uniform.
    const float coef = grad_logp[row] * factor;
    const float coef_h = kEntropy ? grad_ent[row] * factor : 0.f;
    thread_write_grad<T, kEntropy>(logits + b * stride_b + t * stride_t, grad + b * grad_stride_b + t * grad_stride_t,
                                   vocab, stride_v, grad_stride_v, target[b * target_stride_b + t * target_stride_t],
                                   coef, coef_h, scale, LogSumExp::split(lse[row]), kEntropy ? ent[row] : 0.f);
  }
}

struct RowArgs {
  int64_t batch, length, vocab, stride_b, stride_t, stride_v;
  const int64_t* target;
  int64_t target_stride_b, target_stride_t;
};

template <typename T, bool kEntropy>
int launch_forward(const void* logits, const RowArgs& a, const uint8_t* live, int64_t live_stride_b,
                   int64_t live_stride_t, Scale scale, float* logp, double* lse, float* ent, cudaStream_t stream) {
  const int64_t rows = a.batch * a.length;
  logprobs_forward_kernel<T, kEntropy><<<row_blocks(rows), row_threads<T>(a.vocab), 0, stream>>>(
      static_cast<const T*>(logits), a.target, live, logp, lse, ent, rows, a.length, a.vocab, a.stride_b, a.stride_t,
      a.stride_v, a.target_stride_b, a.target_stride_t, live_stride_b, live_stride_t, scale);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, bool kEntropy>
int launch_backward(const float* grad_logp, const float* grad_scale, const float* grad_ent, const float* ent,
                    const void* logits, const RowArgs& a, const double* lse, Scale scale, void* grad,
                    int64_t grad_stride_b, int64_t grad_stride_t, int64_t grad_stride_v, cudaStream_t stream) {
  const int64_t rows = a.batch * a.length;
  logprobs_backward_kernel<T, kEntropy><<<row_blocks(rows), row_threads<T>(a.vocab), 0, stream>>>(
      grad_logp, grad_scale, grad_ent, ent, static_cast<const T*>(logits), a.target, lse, static_cast<T*>(grad), rows,
      a.length, a.vocab, a.stride_b, a.stride_t, a.stride_v, a.target_stride_b, a.target_stride_t, grad_stride_b,
      grad_stride_t, grad_stride_v, scale);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace lk

extern "C" int lk_logprobs_forward(const void* logits, int dtype, int64_t batch, int64_t length, int64_t vocab,
                                   int64_t stride_b, int64_t stride_t, int64_t stride_v, const int64_t* target,
                                   int64_t target_stride_b, int64_t target_stride_t, const uint8_t* live,
                                   int64_t live_stride_b, int64_t live_stride_t, float inv_temperature_hi,
                                   float inv_temperature_lo, float* logp, double* lse, float* ent, void* stream) {
  using namespace lk;
  if (bad_sizes(batch, length, vocab)) return LK_ERROR_ARGUMENT;
  if (batch * length == 0) return 0;
  if (logits == nullptr || target == nullptr || logp == nullptr || lse == nullptr) return LK_ERROR_ARGUMENT;
  const RowArgs args{batch, length, vocab, stride_b, stride_t, stride_v, target, target_stride_b, target_stride_t};
  const Scale scale{inv_temperature_hi, inv_temperature_lo};
  const auto s = static_cast<cudaStream_t>(stream);
  if (ent == nullptr) {
    LK_DISPATCH(dtype, (launch_forward<T, false>(logits, args, live, live_stride_b, live_stride_t, scale, logp, lse,
                                                 ent, s)))
  }
  LK_DISPATCH(dtype, (launch_forward<T, true>(logits, args, live, live_stride_b, live_stride_t, scale, logp, lse, ent,
                                              s)))
}

extern "C" int lk_logprobs_backward(const float* grad_logp, const float* grad_scale, const float* grad_entropy,
                                    const float* entropy, const void* logits, int dtype, int64_t batch,
                                    int64_t length, int64_t vocab, int64_t stride_b, int64_t stride_t,
                                    int64_t stride_v, const int64_t* target, int64_t target_stride_b,
                                    int64_t target_stride_t, const double* lse, float inv_temperature_hi,
                                    float inv_temperature_lo, void* grad, int64_t grad_stride_b,
                                    int64_t grad_stride_t, int64_t grad_stride_v, void* stream) {
  using namespace lk;
  if (bad_sizes(batch, length, vocab)) return LK_ERROR_ARGUMENT;
  if (batch * length == 0) return 0;
  if (grad_logp == nullptr || logits == nullptr || target == nullptr || lse == nullptr || grad == nullptr ||
      (grad_entropy != nullptr && entropy == nullptr))
    return LK_ERROR_ARGUMENT;
  const RowArgs args{batch, length, vocab, stride_b, stride_t, stride_v, target, target_stride_b, target_stride_t};
  const Scale scale{inv_temperature_hi, inv_temperature_lo};
  const auto s = static_cast<cudaStream_t>(stream);
  if (grad_entropy == nullptr) {
    LK_DISPATCH(dtype, (launch_backward<T, false>(grad_logp, grad_scale, grad_entropy, entropy, logits, args, lse,
                                                  scale, grad, grad_stride_b, grad_stride_t, grad_stride_v, s)))
  }
  LK_DISPATCH(dtype, (launch_backward<T, true>(grad_logp, grad_scale, grad_entropy, entropy, logits, args, lse, scale,
                                               grad, grad_stride_b, grad_stride_t, grad_stride_v, s)))
}
