// SPEC step 8 for one token, shared by the token kernel (token_loss.cu, two-pass path) and the
// one-pass loss (fused_loss.cu).  float64, following lens_kernels.reference operation by
// operation: ties of min split the gradient in halves, clamp passes it at its bounds.
#pragma once

#include "device_utils.cuh"
#include "lens_kernels_cuda.h"

namespace lk {

struct TokenTerms {
  double loss;     // the token's objective
  double grad;     // d loss / d logp
  double clipped;  // 1 when the clipped branch is the active one
  double k3;       // the k3 KL estimate (0 without ref)
};

// Gradient of min(a, b) with respect to its arguments' common input, torch's rule: the smaller
// one's gradient, the mean of both on a tie (NaN compares as a tie, the value is then NaN).
__device__ __forceinline__ void min_with_grad(double a, double da, double b, double db, double& value, double& grad) {
  if (a < b) {
    value = a;
    grad = da;
  } else if (b < a) {
    value = b;
    grad = db;
  } else {
    value = a;
    grad = 0.5 * (da + db);
  }
}

__device__ __forceinline__ TokenTerms token_terms(double logp, double old, double a, double ref,
                                                  const lk_surrogate_config& cfg) {
  const double low = 1.0 - cfg.eps_low, high = 1.0 + cfg.eps_high;
  const double ratio = exp(logp - old);
  const double clipped_ratio = ratio < low ? low : (ratio > high ? high : ratio);
  const bool inside = ratio >= low && ratio <= high;  // clamp passes the gradient at its bounds
  // a = 0 contributes 0 whatever the ratio (one that overflows would give 0 * inf = NaN), a NaN
  // ratio excepted; an overflowing ratio on the clipped branch has gradient 0, never inf * 0.
  const double unclipped = (a == 0.0 && ratio == ratio) ? 0.0 : a * ratio;
  double surrogate, d_surrogate;                    // min(a * ratio, a * clip(ratio)), d/d logp
  min_with_grad(unclipped, unclipped, a * clipped_ratio, inside ? unclipped : 0.0, surrogate, d_surrogate);
  TokenTerms terms{-surrogate, -d_surrogate, (-a * clipped_ratio > -unclipped) ? 1.0 : 0.0, 0.0};
  if (cfg.has_clip_ratio_c && a < 0.0) {  // dual clip: min(value, -a * c), c a constant
    min_with_grad(terms.loss, terms.grad, -a * cfg.clip_ratio_c, 0.0, terms.loss, terms.grad);
  }
  if (cfg.has_ref) {
    const double delta = ref - logp;
    const double e = exp(delta);
    terms.k3 = e - delta - 1.0;
    if (cfg.add_kl) {
      terms.loss += cfg.beta * terms.k3;
      terms.grad += cfg.beta * (1.0 - e);
    }
  }
  return terms;
}

}  // namespace lk
