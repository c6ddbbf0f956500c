// The token kernel of the two-pass loss (SPEC steps 8-9 on [B, T] log-probs): one block per
// row, the row's advantage and aggregation weight from the shared calibration, dlogp (fp32)
// and the row's weighted loss, clipped-token count and k3 sum (float64) for the finalize.
// Masked-out positions are skipped (never multiplied by 0); reductions have a fixed order.
#include "lens_kernels_cuda.h"
#include "token_math.cuh"

namespace lk {
namespace {

__global__ void __launch_bounds__(kMaxThreads)
    token_loss_kernel(const float* __restrict__ logp, const float* __restrict__ old, int64_t old_stride_b,
                      int64_t old_stride_t, const uint8_t* __restrict__ live, int64_t live_stride_b,
                      int64_t live_stride_t, const float* __restrict__ ref, int64_t ref_stride_b,
                      int64_t ref_stride_t, const double* __restrict__ advantages, int64_t adv_stride,
                      const double* __restrict__ weights, int64_t batch, int64_t length, lk_surrogate_config cfg,
                      float* __restrict__ dlogp, double* __restrict__ parts) {
  for (int64_t row = blockIdx.x; row < batch; row += gridDim.x) {
    const double a = advantages[row * adv_stride], weight = weights[row];
    double loss = 0.0, clipped = 0.0, k3 = 0.0;
    for (int64_t t = threadIdx.x; t < length; t += blockDim.x) {
      const int64_t k = row * length + t;
      if (live[row * live_stride_b + t * live_stride_t] == 0) {
        dlogp[k] = 0.f;
        continue;
      }
      const double lp = logp[k];
      const double o = old == nullptr ? lp : static_cast<double>(old[row * old_stride_b + t * old_stride_t]);
      const double r = ref == nullptr ? lp : static_cast<double>(ref[row * ref_stride_b + t * ref_stride_t]);
      const TokenTerms terms = token_terms(lp, o, a, r, cfg);
      loss += terms.loss;
      clipped += terms.clipped;
      k3 += terms.k3;
      dlogp[k] = static_cast<float>(weight * terms.grad);
    }
    loss = block_reduce(loss, SumOp{}, 0.0);
    clipped = block_reduce(clipped, SumOp{}, 0.0);
    k3 = block_reduce(k3, SumOp{}, 0.0);
    if (threadIdx.x == 0) {
      parts[row] = weight * loss;
      parts[batch + row] = clipped;
      parts[2 * batch + row] = k3;
    }
  }
}

}  // namespace
}  // namespace lk

extern "C" int lk_token_loss(const float* logp, const float* old, int64_t old_stride_b, int64_t old_stride_t,
                             const uint8_t* live, int64_t live_stride_b, int64_t live_stride_t, const float* ref,
                             int64_t ref_stride_b, int64_t ref_stride_t, const double* advantages,
                             int64_t adv_stride, const double* weights, int64_t batch, int64_t length,
                             const lk_surrogate_config* cfg, float* dlogp, double* parts, void* stream) {
  using namespace lk;
  if (batch < 0 || length < 0 || cfg == nullptr) return LK_ERROR_ARGUMENT;
  if (batch == 0) return 0;
  if (logp == nullptr || live == nullptr || advantages == nullptr || weights == nullptr || dlogp == nullptr ||
      parts == nullptr || (cfg->has_ref && ref == nullptr))
    return LK_ERROR_ARGUMENT;
  const auto s = static_cast<cudaStream_t>(stream);
  token_loss_kernel<<<row_blocks(batch), block_threads(length), 0, s>>>(
      logp, old, old_stride_b, old_stride_t, live, live_stride_b, live_stride_t, ref, ref_stride_b, ref_stride_t,
      advantages, adv_stride, weights, batch, length, *cfg, dlogp, parts);
  return static_cast<int>(cudaGetLastError());
}
