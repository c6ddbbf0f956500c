// The one-pass loss: log-prob, surrogate and gradient of a row in one thread block.
//
// Used when every token's coefficient is known before the vocabulary pass (old log-probs
// given, grpo mode or caller-given advantages: lens_kernels/backends/kernel_loss.py).  A
// masked-out row writes zeros and reads nothing.  A live row: the online logsumexp and the
// target logit (vocab_row.cuh; logits scaled by 1 / t without bias), then thread 0 computes
// the token's terms (token_math.cuh, with the row's advantage and aggregation weight from the
// shared calibration) and the coefficient
// it broadcasts through shared memory, then the block writes coef * (onehot - p) into the
// gradient (a new buffer, or the logits' own storage), rereading the row it has just read.
#include <cmath>

#include "token_math.cuh"
#include "vocab_row.cuh"

namespace lk {
namespace {

struct FusedArgs {
  int64_t rows, length, vocab;
  int64_t stride_b, stride_t, stride_v;
  const int64_t* target;
  int64_t target_stride_b, target_stride_t;
  const uint8_t* live;
  int64_t live_stride_b, live_stride_t;
  const float* old;  // nullptr: on-policy
  int64_t old_stride_b, old_stride_t;
  const float* ref;  // nullptr: no reference
  int64_t ref_stride_b, ref_stride_t;
  const double* advantages;
  int64_t adv_stride;
  const double* weights;
  Scale scale;  // 1 / t
  int64_t grad_stride_b, grad_stride_t, grad_stride_v;
  float* logp;
  double* parts;  // [3, rows]
};

// No __restrict__ on logits / grad: they are the same storage for the in-place variant.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads) fused_loss_kernel(const T* logits, T* grad, FusedArgs args,
                                                                 lk_surrogate_config cfg) {
  __shared__ float coef_shared;
  for (int64_t row = blockIdx.x; row < args.rows; row += gridDim.x) {
    const int64_t b = row / args.length;
    const int64_t t = row - b * args.length;
    T* out = grad == nullptr ? nullptr : grad + b * args.grad_stride_b + t * args.grad_stride_t;
    if (args.live[b * args.live_stride_b + t * args.live_stride_t] == 0) {
      if (threadIdx.x == 0) {
        args.logp[row] = 0.f;
        args.parts[row] = args.parts[args.rows + row] = args.parts[2 * args.rows + row] = 0.0;
      }
      if (out != nullptr) thread_zero_row(out, args.vocab, args.grad_stride_v);
      continue;
    }
    const T* x = logits + b * args.stride_b + t * args.stride_t;
    const int64_t target = args.target[b * args.target_stride_b + t * args.target_stride_t];
    float z_target;
    const RowStats stats = row_stats<T, false>(x, args.vocab, args.stride_v, args.scale, target, z_target);
    if (threadIdx.x == 0) {
      const float lp = stats.log_p(z_target);
      const double old = args.old == nullptr ? lp : args.old[b * args.old_stride_b + t * args.old_stride_t];
      const double ref = args.ref == nullptr ? lp : args.ref[b * args.ref_stride_b + t * args.ref_stride_t];
      const double weight = args.weights[b];
      const TokenTerms terms = token_terms(lp, old, args.advantages[b * args.adv_stride], ref, cfg);
      args.logp[row] = lp;
      args.parts[row] = weight * terms.loss;
      args.parts[args.rows + row] = terms.clipped;
      args.parts[2 * args.rows + row] = terms.k3;
      coef_shared = static_cast<float>(weight * terms.grad) * args.scale.inv_t();
    }
    __syncthreads();
    const float coef = coef_shared;  // the same in every thread: the branch below is uniform
    if (out != nullptr)
      thread_write_grad<T, false>(x, out, args.vocab, args.stride_v, args.grad_stride_v, target, coef, 0.f,
                                  args.scale, LogSumExp{stats.m, stats.log_s}, 0.f);
    __syncthreads();  // coef_shared is rewritten by the next row
  }
}

template <typename T>
int launch_fused(const void* logits, void* grad, const FusedArgs& args, const lk_surrogate_config& cfg,
                 cudaStream_t stream) {
  const int threads = row_threads<T>(args.vocab);
  fused_loss_kernel<T><<<row_blocks(args.rows), threads, 0, stream>>>(static_cast<const T*>(logits),
                                                                      static_cast<T*>(grad), args, cfg);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace lk

extern "C" int lk_fused_loss(const void* logits, int dtype, int64_t batch, int64_t length, int64_t vocab,
                             int64_t stride_b, int64_t stride_t, int64_t stride_v, const int64_t* target,
                             int64_t target_stride_b, int64_t target_stride_t, const uint8_t* live,
                             int64_t live_stride_b, int64_t live_stride_t, const float* old, int64_t old_stride_b,
                             int64_t old_stride_t, const float* ref, int64_t ref_stride_b, int64_t ref_stride_t,
                             const double* advantages, int64_t adv_stride, const double* weights,
                             float inv_temperature_hi, float inv_temperature_lo, const lk_surrogate_config* cfg,
                             void* grad, int64_t grad_stride_b, int64_t grad_stride_t, int64_t grad_stride_v,
                             float* logp, double* parts, void* stream) {
  using namespace lk;
  if (bad_sizes(batch, length, vocab) || cfg == nullptr) return LK_ERROR_ARGUMENT;
  if (batch * length == 0) return 0;
  if (logits == nullptr || target == nullptr || live == nullptr || advantages == nullptr || weights == nullptr ||
      logp == nullptr || parts == nullptr || (cfg->has_ref && ref == nullptr))
    return LK_ERROR_ARGUMENT;
  const FusedArgs args{batch * length, length, vocab, stride_b, stride_t, stride_v, target, target_stride_b,
                       target_stride_t, live, live_stride_b, live_stride_t, old, old_stride_b, old_stride_t, ref,
                       ref_stride_b, ref_stride_t, advantages, adv_stride, weights,
                       Scale{inv_temperature_hi, inv_temperature_lo}, grad_stride_b, grad_stride_t, grad_stride_v,
                       logp, parts};
  const auto s = static_cast<cudaStream_t>(stream);
  LK_DISPATCH(dtype, launch_fused<T>(logits, grad, args, *cfg, s))
}
