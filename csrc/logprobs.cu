// The vocabulary pass (SPEC step 1) and its backward: one thread block per (b, t) row.
//
// Forward: the online logsumexp of the row plus the target logit (vocab_row.cuh), so a row is
// read exactly once; rows whose completion mask is 0 are not read (logp = lse = 0).  Backward:
// grad = grad_logp * grad_scale * inv_t * (onehot - exp(z - lse)), recomputing the softmax
// from the saved lse; rows with a zero coefficient get zeros without reading the logits.
#include <cmath>

#include "lens_kernels_cuda.h"
#include "vocab_row.cuh"

namespace lk {
namespace {

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    logprobs_forward_kernel(const T* __restrict__ logits, const int64_t* __restrict__ target,
                            const uint8_t* __restrict__ live, float* __restrict__ logp, float* __restrict__ lse,
                            int64_t rows, int64_t length, int64_t vocab, int64_t stride_b, int64_t stride_t,
                            int64_t stride_v, int64_t target_stride_b, int64_t target_stride_t,
                            int64_t live_stride_b, int64_t live_stride_t, float inv_t) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / length;
    const int64_t t = row - b * length;
    if (live != nullptr && live[b * live_stride_b + t * live_stride_t] == 0) {
      if (threadIdx.x == 0) logp[row] = lse[row] = 0.f;
      continue;
    }
    const T* x = logits + b * stride_b + t * stride_t;
    float z_target;
    const float row_lse_value =
        row_lse(x, vocab, stride_v, inv_t, target[b * target_stride_b + t * target_stride_t], z_target);
    if (threadIdx.x == 0) {
      lse[row] = row_lse_value;
      logp[row] = z_target - row_lse_value;
    }
  }
}

// No __restrict__ on logits / grad: they are the same storage for the in-place backward.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    logprobs_backward_kernel(const float* __restrict__ grad_logp, const float* __restrict__ grad_scale,
                             const T* logits, const int64_t* __restrict__ target, const float* __restrict__ lse,
                             T* grad, int64_t rows, int64_t length, int64_t vocab, int64_t stride_b,
                             int64_t stride_t, int64_t stride_v, int64_t target_stride_b, int64_t target_stride_t,
                             int64_t grad_stride_b, int64_t grad_stride_t, int64_t grad_stride_v, float inv_t) {
  const float scale = grad_scale == nullptr ? 1.f : *grad_scale;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / length;
    const int64_t t = row - b * length;
    const float g = grad_logp[row] * scale;  // the same value in every thread: the branch is uniform
    thread_write_grad(logits + b * stride_b + t * stride_t, grad + b * grad_stride_b + t * grad_stride_t, vocab,
                      stride_v, grad_stride_v, target[b * target_stride_b + t * target_stride_t], g * inv_t, inv_t,
                      lse[row]);
  }
}

template <typename T>
int launch_forward(const void* logits, int64_t batch, int64_t length, int64_t vocab, int64_t stride_b,
                   int64_t stride_t, int64_t stride_v, const int64_t* target, int64_t target_stride_b,
                   int64_t target_stride_t, const uint8_t* live, int64_t live_stride_b, int64_t live_stride_t,
                   float inv_t, float* logp, float* lse, cudaStream_t stream) {
  const int64_t rows = batch * length;
  const int threads = row_threads<T>(vocab);
  logprobs_forward_kernel<T><<<row_blocks(rows), threads, 0, stream>>>(
      static_cast<const T*>(logits), target, live, logp, lse, rows, length, vocab, stride_b, stride_t, stride_v,
      target_stride_b, target_stride_t, live_stride_b, live_stride_t, inv_t);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_backward(const float* grad_logp, const float* grad_scale, const void* logits, int64_t batch,
                    int64_t length, int64_t vocab, int64_t stride_b, int64_t stride_t, int64_t stride_v,
                    const int64_t* target, int64_t target_stride_b, int64_t target_stride_t, const float* lse,
                    float inv_t, void* grad, int64_t grad_stride_b, int64_t grad_stride_t, int64_t grad_stride_v,
                    cudaStream_t stream) {
  const int64_t rows = batch * length;
  const int threads = row_threads<T>(vocab);
  logprobs_backward_kernel<T><<<row_blocks(rows), threads, 0, stream>>>(
      grad_logp, grad_scale, static_cast<const T*>(logits), target, lse, static_cast<T*>(grad), rows, length, vocab,
      stride_b, stride_t, stride_v, target_stride_b, target_stride_t, grad_stride_b, grad_stride_t, grad_stride_v,
      inv_t);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace lk

extern "C" int lk_logprobs_forward(const void* logits, int dtype, int64_t batch, int64_t length, int64_t vocab,
                                   int64_t stride_b, int64_t stride_t, int64_t stride_v, const int64_t* target,
                                   int64_t target_stride_b, int64_t target_stride_t, const uint8_t* live,
                                   int64_t live_stride_b, int64_t live_stride_t, float inv_temperature,
                                   float* logp, float* lse, void* stream) {
  if (lk::bad_sizes(batch, length, vocab)) return LK_ERROR_ARGUMENT;
  if (batch * length == 0) return 0;
  if (logits == nullptr || target == nullptr || logp == nullptr || lse == nullptr) return LK_ERROR_ARGUMENT;
  const auto s = static_cast<cudaStream_t>(stream);
  LK_DISPATCH(dtype, lk::launch_forward<T>(logits, batch, length, vocab, stride_b, stride_t, stride_v, target,
                                           target_stride_b, target_stride_t, live, live_stride_b, live_stride_t,
                                           inv_temperature, logp, lse, s))
}

extern "C" int lk_logprobs_backward(const float* grad_logp, const float* grad_scale, const void* logits, int dtype,
                                    int64_t batch, int64_t length, int64_t vocab, int64_t stride_b, int64_t stride_t,
                                    int64_t stride_v, const int64_t* target, int64_t target_stride_b,
                                    int64_t target_stride_t, const float* lse, float inv_temperature, void* grad,
                                    int64_t grad_stride_b, int64_t grad_stride_t, int64_t grad_stride_v,
                                    void* stream) {
  if (lk::bad_sizes(batch, length, vocab)) return LK_ERROR_ARGUMENT;
  if (batch * length == 0) return 0;
  if (grad_logp == nullptr || logits == nullptr || target == nullptr || lse == nullptr || grad == nullptr)
    return LK_ERROR_ARGUMENT;
  const auto s = static_cast<cudaStream_t>(stream);
  LK_DISPATCH(dtype, lk::launch_backward<T>(grad_logp, grad_scale, logits, batch, length, vocab, stride_b, stride_t,
                                            stride_v, target, target_stride_b, target_stride_t, lse,
                                            inv_temperature, grad, grad_stride_b, grad_stride_t, grad_stride_v, s))
}
