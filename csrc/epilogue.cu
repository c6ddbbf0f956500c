// The group epilogue, SPEC steps 3-9, on [B, T] fp32 token log-probs: five small launches.
//
//   row_confidence   one block per row:   n_b, pibar_b                         (step 3)
//   group_advantages one block per group: negative?, D, rt, A                  (steps 4-7)
//   batch_totals     one block:           masked tokens N, live rows R, negative fraction
//   token_objective  one block per row:   per-token loss and d loss / d logp   (steps 8-9)
//   finalize         one block:           loss, clip fraction, kl
//
// Everything is accumulated in float64 (the work is O(B*T), negligible beside the vocabulary
// pass) and follows lens_kernels.reference operation by operation: masked positions are
// skipped (never multiplied by 0), empty rows get pibar = 0 and weight 0, ties of min split the
// gradient in halves and clamp passes gradients at its bounds.  Reductions have a fixed order,
// so results are deterministic.
#include <cmath>

#include "device_utils.cuh"
#include "lens_kernels_cuda.h"

namespace lk {
namespace {

constexpr int kGroupThreads = 64;
constexpr int kSerialThreads = 256;

// Scratch (doubles) carved from the caller's workspace.
struct Workspace {
  double* pibar;      // [B]
  double* count;      // [B] n_b
  double* adv;        // [B]
  double* row_loss;   // [B] aggregation weight * sum of the row's token losses
  double* row_clip;   // [B] clipped tokens of the row
  double* row_kl;     // [B] sum of the row's k3
  double* negative;   // [G] 1 for a negative group
  double* totals;     // [2] N (masked tokens), R (rows with tokens)
};

Workspace carve(double* base, int64_t batch, int64_t num_groups) {
  return {base, base + batch, base + 2 * batch, base + 3 * batch, base + 4 * batch,
          base + 5 * batch, base + 6 * batch, base + 6 * batch + num_groups};
}

__global__ void __launch_bounds__(kMaxThreads)
    row_confidence_kernel(const float* __restrict__ old, const float* __restrict__ mask, int64_t batch,
                          int64_t length, Workspace ws, float* __restrict__ confidence) {
  for (int64_t row = blockIdx.x; row < batch; row += gridDim.x) {
    double n = 0.0, total = 0.0;
    for (int64_t t = threadIdx.x; t < length; t += blockDim.x) {
      const int64_t k = row * length + t;
      if (mask[k] != 0.f) {
        n += 1.0;
        total += old[k];
      }
    }
    n = block_reduce(n, SumOp{}, 0.0);
    total = block_reduce(total, SumOp{}, 0.0);
    if (threadIdx.x == 0) {
      const double pibar = n > 0.0 ? exp(total / n) : 0.0;
      ws.pibar[row] = pibar;
      ws.count[row] = n;
      confidence[row] = static_cast<float>(pibar);
    }
  }
}

struct Group {
  const int64_t* members;  // order[start[g] :]
  int64_t size;
  double difficulty;
  bool negative;
  bool use_rt;  // advantages from rt (else from r), by mode and group type
};

// The reward row `row` of group `grp` computes its advantage from: rt (step 6 or 10) or r.
__device__ double used_reward(const Group& grp, int64_t row, const float* rewards, const Workspace& ws,
                              const lk_epilogue_config& cfg) {
  const double r = rewards[row];
  if (!grp.use_rt) return r;
  const double pibar = ws.pibar[row];
  if (!(pibar > 0.0)) return r;  // no penalty for pibar = 0
  double penalty;
  if (cfg.has_length_gamma) {
    const double gap = fmax(cfg.length_gamma - pibar, cfg.length_gamma_min_gap * cfg.length_gamma);
    penalty = pibar / (fmax(ws.count[row], 1.0) * gap);
  } else {
    penalty = pibar / (static_cast<double>(grp.size) * (grp.difficulty - pibar));
  }
  return r - (1.0 - r) * penalty;
}

__global__ void __launch_bounds__(kGroupThreads)
    group_advantages_kernel(const float* __restrict__ rewards, const int64_t* __restrict__ order,
                            const int64_t* __restrict__ start, const int64_t* __restrict__ size,
                            int64_t num_groups, Workspace ws, lk_epilogue_config cfg,
                            float* __restrict__ difficulty, float* __restrict__ calibrated,
                            float* __restrict__ advantages) {
  const bool lens_mixed = cfg.mode == LK_MODE_LENS || cfg.mode == LK_MODE_LENS_MIXED_ONLY;
  const bool lens_negative = cfg.mode == LK_MODE_LENS || cfg.mode == LK_MODE_LENS_NEGATIVE_ONLY;
  for (int64_t g = blockIdx.x; g < num_groups; g += gridDim.x) {
    Group grp{order + start[g], size[g], 0.0, false, false};
    double top_reward = 0.0, peak = 0.0, inverse = 0.0;
    for (int64_t k = threadIdx.x; k < grp.size; k += blockDim.x) {
      const int64_t row = grp.members[k];
      const double r = rewards[row], pibar = ws.pibar[row];
      top_reward = MaxOp{}(top_reward, r);
      peak = MaxOp{}(peak, pibar);
      if (pibar > 0.0) inverse += r / pibar;
    }
    top_reward = block_reduce(top_reward, MaxOp{}, 0.0);
    peak = block_reduce(peak, MaxOp{}, 0.0);
    inverse = block_reduce(inverse, SumOp{}, 0.0);

    // steps 4-5
    const double group_size = static_cast<double>(grp.size);
    grp.negative = top_reward == 0.0;
    const double implied = inverse > 0.0 ? group_size / inverse : INFINITY;
    grp.difficulty = grp.negative ? 2.0 * peak : MaxOp{}(implied, 2.0 * peak);
    grp.use_rt = grp.negative ? lens_negative : lens_mixed;

    // steps 6-7: mean, then the Bessel-corrected spread around it
    double sum = 0.0;
    for (int64_t k = threadIdx.x; k < grp.size; k += blockDim.x)
      sum += used_reward(grp, grp.members[k], rewards, ws, cfg);
    const double mean = block_reduce(sum, SumOp{}, 0.0) / group_size;
    double squares = 0.0;
    for (int64_t k = threadIdx.x; k < grp.size; k += blockDim.x) {
      const double centred = used_reward(grp, grp.members[k], rewards, ws, cfg) - mean;
      squares += centred * centred;
    }
    const double std_dev = sqrt(block_reduce(squares, SumOp{}, 0.0) / (group_size - 1.0));
    const bool demean_only = grp.negative && lens_negative;
    for (int64_t k = threadIdx.x; k < grp.size; k += blockDim.x) {
      const int64_t row = grp.members[k];
      const double used = used_reward(grp, row, rewards, ws, cfg);
      const double centred = used - mean;
      double adv = centred;
      if (demean_only) {
        adv = cfg.alpha * centred;
      } else if (cfg.scale_by_std) {
        adv = centred / (std_dev + cfg.std_eps);
      }
      ws.adv[row] = adv;
      advantages[row] = static_cast<float>(adv);
      calibrated[row] = static_cast<float>(used);
    }
    if (threadIdx.x == 0) {
      difficulty[g] = static_cast<float>(grp.difficulty);
      ws.negative[g] = grp.negative ? 1.0 : 0.0;
    }
  }
}

__global__ void __launch_bounds__(kSerialThreads)
    batch_totals_kernel(int64_t batch, int64_t num_groups, Workspace ws, float* __restrict__ negative_fraction) {
  double tokens = 0.0, live_rows = 0.0, negative = 0.0;
  for (int64_t row = threadIdx.x; row < batch; row += blockDim.x) {
    tokens += ws.count[row];
    live_rows += ws.count[row] > 0.0 ? 1.0 : 0.0;
  }
  for (int64_t g = threadIdx.x; g < num_groups; g += blockDim.x) negative += ws.negative[g];
  tokens = block_reduce(tokens, SumOp{}, 0.0);
  live_rows = block_reduce(live_rows, SumOp{}, 0.0);
  negative = block_reduce(negative, SumOp{}, 0.0);
  if (threadIdx.x == 0) {
    ws.totals[0] = tokens;
    ws.totals[1] = live_rows;
    *negative_fraction = static_cast<float>(negative / static_cast<double>(num_groups));
  }
}

// d loss / d (row's token sum) for the aggregation of step 9 (0 for rows without tokens).
__device__ double aggregation_weight(int mode, double count, const double* totals, int64_t batch, int64_t length) {
  switch (mode) {
    case LK_AGG_SEQ_MEAN_TOKEN_MEAN:
      return count > 0.0 ? 1.0 / (count * fmax(totals[1], 1.0)) : 0.0;
    case LK_AGG_TOKEN_MEAN:
      return 1.0 / fmax(totals[0], 1.0);
    case LK_AGG_SEQ_MEAN_TOKEN_SUM:
      return 1.0 / fmax(totals[1], 1.0);
    default: {  // LK_AGG_SEQ_MEAN_TOKEN_SUM_NORM
      const double positions = static_cast<double>(batch) * static_cast<double>(length);
      return positions > 0.0 ? 1.0 / positions : 0.0;
    }
  }
}

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

__global__ void __launch_bounds__(kMaxThreads)
    token_objective_kernel(const float* __restrict__ logp, const float* __restrict__ old,
                           const float* __restrict__ mask, const float* __restrict__ ref, int64_t batch,
                           int64_t length, Workspace ws, lk_epilogue_config cfg, float* __restrict__ dlogp) {
  const double low = 1.0 - cfg.eps_low, high = 1.0 + cfg.eps_high;
  const bool kl_in_loss = cfg.has_ref && cfg.beta > 0.0;
  for (int64_t row = blockIdx.x; row < batch; row += gridDim.x) {
    const double weight = aggregation_weight(cfg.loss_agg_mode, ws.count[row], ws.totals, batch, length);
    const double a = ws.adv[row];
    double loss_sum = 0.0, clip_sum = 0.0, kl_sum = 0.0;
    for (int64_t t = threadIdx.x; t < length; t += blockDim.x) {
      const int64_t k = row * length + t;
      if (mask[k] == 0.f) {
        dlogp[k] = 0.f;
        continue;
      }
      const double lp = logp[k];
      const double ratio = exp(lp - static_cast<double>(old[k]));
      const double clipped_ratio = ratio < low ? low : (ratio > high ? high : ratio);
      const bool inside = ratio >= low && ratio <= high;  // clamp passes the gradient at its bounds
      double surrogate, d_surrogate;                    // min(a * ratio, a * clip(ratio)), d/d logp
      min_with_grad(a * ratio, a * ratio, a * clipped_ratio, inside ? a * ratio : 0.0, surrogate, d_surrogate);
      double value = -surrogate, grad = -d_surrogate;
      if (cfg.has_clip_ratio_c && a < 0.0) {  // dual clip: min(value, -a * c), c a constant
        min_with_grad(value, grad, -a * cfg.clip_ratio_c, 0.0, value, grad);
      }
      clip_sum += (-a * clipped_ratio > -a * ratio) ? 1.0 : 0.0;
      if (cfg.has_ref) {
        const double delta = static_cast<double>(ref[k]) - lp;
        const double e = exp(delta);
        const double k3 = e - delta - 1.0;
        kl_sum += k3;
        if (kl_in_loss) {
          value += cfg.beta * k3;
          grad += cfg.beta * (1.0 - e);
        }
      }
      loss_sum += value;
      dlogp[k] = static_cast<float>(weight * grad);
    }
    loss_sum = block_reduce(loss_sum, SumOp{}, 0.0);
    clip_sum = block_reduce(clip_sum, SumOp{}, 0.0);
    kl_sum = block_reduce(kl_sum, SumOp{}, 0.0);
    if (threadIdx.x == 0) {
      ws.row_loss[row] = weight * loss_sum;
      ws.row_clip[row] = clip_sum;
      ws.row_kl[row] = kl_sum;
    }
  }
}

__global__ void __launch_bounds__(kSerialThreads)
    finalize_kernel(int64_t batch, Workspace ws, int has_ref, float* __restrict__ loss,
                    float* __restrict__ clip_fraction, float* __restrict__ kl) {
  double total_loss = 0.0, clipped = 0.0, k3 = 0.0;
  for (int64_t row = threadIdx.x; row < batch; row += blockDim.x) {
    total_loss += ws.row_loss[row];
    clipped += ws.row_clip[row];
    k3 += ws.row_kl[row];
  }
  total_loss = block_reduce(total_loss, SumOp{}, 0.0);
  clipped = block_reduce(clipped, SumOp{}, 0.0);
  k3 = block_reduce(k3, SumOp{}, 0.0);
  if (threadIdx.x == 0) {
    const double tokens = fmax(ws.totals[0], 1.0);
    *loss = static_cast<float>(total_loss);
    *clip_fraction = static_cast<float>(clipped / tokens);
    if (has_ref) *kl = static_cast<float>(k3 / tokens);
  }
}

bool bad_config(const lk_epilogue_config& cfg) {
  return cfg.mode < LK_MODE_LENS || cfg.mode > LK_MODE_LENS_NEGATIVE_ONLY ||
         cfg.loss_agg_mode < LK_AGG_SEQ_MEAN_TOKEN_MEAN || cfg.loss_agg_mode > LK_AGG_SEQ_MEAN_TOKEN_SUM_NORM;
}

}  // namespace
}  // namespace lk

extern "C" int64_t lk_epilogue_workspace_size(int64_t batch, int64_t num_groups) {
  return 6 * batch + num_groups + 2;
}

extern "C" int lk_epilogue_forward(const float* logp, const float* old, const float* mask, const float* ref,
                                   const float* rewards, int64_t batch, int64_t length, const int64_t* order,
                                   const int64_t* start, const int64_t* size, int64_t num_groups,
                                   const lk_epilogue_config* cfg, float* loss, float* dlogp, float* advantages,
                                   float* calibrated_rewards, float* confidence, float* difficulty,
                                   float* negative_group_fraction, float* clip_fraction, float* kl,
                                   double* workspace, void* stream) {
  using namespace lk;
  if (batch < 0 || length < 0 || num_groups < 0 || cfg == nullptr || bad_config(*cfg)) return LK_ERROR_ARGUMENT;
  if (workspace == nullptr || loss == nullptr || negative_group_fraction == nullptr || clip_fraction == nullptr ||
      (cfg->has_ref && (ref == nullptr || kl == nullptr)))
    return LK_ERROR_ARGUMENT;
  const auto s = static_cast<cudaStream_t>(stream);
  const Workspace ws = carve(workspace, batch, num_groups);
  const int row_threads = block_threads(length);
  if (batch > 0) {
    row_confidence_kernel<<<row_blocks(batch), row_threads, 0, s>>>(old, mask, batch, length, ws, confidence);
  }
  if (num_groups > 0) {
    group_advantages_kernel<<<row_blocks(num_groups), kGroupThreads, 0, s>>>(
        rewards, order, start, size, num_groups, ws, *cfg, difficulty, calibrated_rewards, advantages);
  }
  batch_totals_kernel<<<1, kSerialThreads, 0, s>>>(batch, num_groups, ws, negative_group_fraction);
  if (batch > 0) {
    token_objective_kernel<<<row_blocks(batch), row_threads, 0, s>>>(logp, old, mask, ref, batch, length, ws,
                                                                    *cfg, dlogp);
  }
  finalize_kernel<<<1, kSerialThreads, 0, s>>>(batch, ws, cfg->has_ref, loss, clip_fraction, kl);
  return static_cast<int>(cudaGetLastError());
}
