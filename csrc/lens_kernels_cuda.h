/* C ABI of liblens_kernels_cuda.so, the CUDA backend of lens-kernels.
 *
 * Plain C types only, so the library builds without PyTorch headers and loads with ctypes
 * (lens_kernels/backends/cuda/library.py mirrors every declaration here).  Tensors are passed
 * as device pointers with sizes and element strides; every entry point enqueues its kernels on
 * the given cudaStream_t (passed as void*) of the current device and returns 0 or an error
 * code: a cudaError_t (> 0) or one of the LK_ERROR_* values (< 0); lk_error_string names it.
 * Nothing synchronises and nothing allocates: scratch memory comes from the caller.
 */
#ifndef LENS_KERNELS_CUDA_H_
#define LENS_KERNELS_CUDA_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LK_EXPORT __attribute__((visibility("default")))

/* Bumped whenever a signature or struct below changes. */
#define LK_ABI_VERSION 1

/* Element type of the logits (and of their gradient). */
enum { LK_FLOAT32 = 0, LK_BFLOAT16 = 1, LK_FLOAT16 = 2 };

/* Errors detected before any launch. */
enum { LK_ERROR_DTYPE = -1, LK_ERROR_ARGUMENT = -2 };

/* SPEC 1.7 advantage modes and 1.9 aggregations, numbered as lens_kernels.config lists them. */
enum { LK_MODE_LENS = 0, LK_MODE_GRPO = 1, LK_MODE_LENS_MIXED_ONLY = 2, LK_MODE_LENS_NEGATIVE_ONLY = 3 };
enum {
  LK_AGG_SEQ_MEAN_TOKEN_MEAN = 0,
  LK_AGG_TOKEN_MEAN = 1,
  LK_AGG_SEQ_MEAN_TOKEN_SUM = 2,
  LK_AGG_SEQ_MEAN_TOKEN_SUM_NORM = 3
};

/* The scalar options of lens_kernels.config.LossConfig. */
typedef struct {
  int32_t mode;             /* LK_MODE_* */
  int32_t loss_agg_mode;    /* LK_AGG_* */
  int32_t scale_by_std;     /* 0 or 1 */
  int32_t has_clip_ratio_c; /* dual clip on (clip_ratio_c > 1) */
  int32_t has_length_gamma; /* SPEC 1.10 penalty instead of 1.6 */
  int32_t has_ref;          /* ref_logprobs given (k3 metric; in the loss when beta > 0) */
  double alpha;
  double eps_low;
  double eps_high;
  double clip_ratio_c;
  double beta;
  double std_eps;
  double length_gamma;
  double length_gamma_min_gap; /* config.LENGTH_GAMMA_MIN_GAP */
} lk_epilogue_config;

LK_EXPORT int lk_abi_version(void);
LK_EXPORT size_t lk_epilogue_config_size(void);
LK_EXPORT const char* lk_error_string(int code);

/* 0 when this library's kernels can run on CUDA device `device` (driver new enough, a
 * matching SASS or PTX image); the current device is left unchanged. */
LK_EXPORT int lk_probe_device(int device);

/* SPEC 1.1.  logits [B, T, V] of `dtype` with element strides (stride_b, stride_t, stride_v);
 * target [B*T] int64; writes logp [B*T] and lse [B*T] (fp32, contiguous), where
 * lse = logsumexp_v(logits * inv_temperature) and logp = logits[target] * inv_temperature - lse. */
LK_EXPORT int lk_logprobs_forward(const void* logits, int dtype, int64_t batch, int64_t length,
                                  int64_t vocab, int64_t stride_b, int64_t stride_t,
                                  int64_t stride_v, const int64_t* target, float inv_temperature,
                                  float* logp, float* lse, void* stream);

/* grad[b, t, v] = grad_logp * inv_temperature * (1[v == target] - exp(z - lse)) in `dtype`,
 * written with the element strides (grad_stride_b, grad_stride_t, grad_stride_v); rows with
 * grad_logp == 0 get zeros without reading logits.  grad may equal logits (in place, same
 * strides): each element is read before it is overwritten, by the thread that writes it. */
LK_EXPORT int lk_logprobs_backward(const float* grad_logp, const void* logits, int dtype,
                                   int64_t batch, int64_t length, int64_t vocab,
                                   int64_t stride_b, int64_t stride_t, int64_t stride_v,
                                   const int64_t* target, const float* lse,
                                   float inv_temperature, void* grad, int64_t grad_stride_b,
                                   int64_t grad_stride_t, int64_t grad_stride_v, void* stream);

/* Doubles of scratch lk_epilogue_forward needs for `batch` rows and `num_groups` groups. */
LK_EXPORT int64_t lk_epilogue_workspace_size(int64_t batch, int64_t num_groups);

/* SPEC steps 3-9.  logp, old, mask (0/1), ref (NULL when absent): [B*T] fp32 contiguous;
 * rewards [B] fp32; groups: order [B] (rows sorted by group), start [G], size [G] int64.
 * Outputs (fp32): loss [1], dlogp [B*T] (d loss / d logp, 0 where masked), advantages [B],
 * calibrated_rewards [B], confidence [B], difficulty [G], negative_group_fraction [1],
 * clip_fraction [1], kl [1] (written when cfg->has_ref).  workspace: lk_epilogue_workspace_size
 * doubles of device memory. */
LK_EXPORT int lk_epilogue_forward(const float* logp, const float* old, const float* mask,
                                  const float* ref, const float* rewards, int64_t batch,
                                  int64_t length, const int64_t* order, const int64_t* start,
                                  const int64_t* size, int64_t num_groups,
                                  const lk_epilogue_config* cfg, float* loss, float* dlogp,
                                  float* advantages, float* calibrated_rewards,
                                  float* confidence, float* difficulty,
                                  float* negative_group_fraction, float* clip_fraction,
                                  float* kl, double* workspace, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* LENS_KERNELS_CUDA_H_ */
