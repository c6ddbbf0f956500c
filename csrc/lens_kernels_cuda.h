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
#define LK_ABI_VERSION 3

/* Element type of the logits (and of their gradient). */
enum { LK_FLOAT32 = 0, LK_BFLOAT16 = 1, LK_FLOAT16 = 2 };

/* Errors detected before any launch. */
enum { LK_ERROR_DTYPE = -1, LK_ERROR_ARGUMENT = -2 };

/* The options of SPEC step 8 (lens_kernels.config.LensOptions). */
typedef struct {
  int32_t has_clip_ratio_c; /* dual clip on (clip_ratio_c > 1) */
  int32_t has_ref;          /* ref_logprobs given (k3 metric) */
  int32_t add_kl;           /* beta * k3 in the loss (has_ref and beta > 0) */
  int32_t reserved;
  double eps_low;
  double eps_high;
  double clip_ratio_c;
  double beta;
} lk_surrogate_config;

LK_EXPORT int lk_abi_version(void);
LK_EXPORT size_t lk_surrogate_config_size(void);
LK_EXPORT const char* lk_error_string(int code);

/* 0 when this library's kernels can run on CUDA device `device` (driver new enough, a
 * matching SASS or PTX image); the current device is left unchanged. */
LK_EXPORT int lk_probe_device(int device);

/* Every [B, T] input below is read with its element strides (stride_b, stride_t); `live` is the
 * completion mask as uint8 0/1.  Rows (b, t) whose live byte is 0 are never read. */

/* Temperature: 1 / t as the fp32 parts (inv_temperature_hi, inv_temperature_lo) of
 * lens_kernels.config.split_float; logits are scaled as z = fmaf(x, hi, x * lo) (x * hi when lo
 * is 0), which carries no one-sided bias, and gradients by hi + lo. */

/* SPEC 1.1.  logits [B, T, V] of `dtype` with element strides (stride_b, stride_t, stride_v);
 * writes logp [B*T] (fp32), lse [B*T] (double: the fp32 max and log-sum parts exactly) and,
 * when ent is not NULL, ent [B*T] (fp32), all contiguous, where z = logits / t,
 * lse = logsumexp_v(z), logp = z[target] - lse and ent = -sum_v p_v log p_v
 * (p = softmax(z), from the same read of the row); rows whose live byte is 0 (live may be NULL:
 * every row) get 0 in every output. */
LK_EXPORT int lk_logprobs_forward(const void* logits, int dtype, int64_t batch, int64_t length,
                                  int64_t vocab, int64_t stride_b, int64_t stride_t,
                                  int64_t stride_v, const int64_t* target, int64_t target_stride_b,
                                  int64_t target_stride_t, const uint8_t* live, int64_t live_stride_b,
                                  int64_t live_stride_t, float inv_temperature_hi,
                                  float inv_temperature_lo, float* logp, double* lse, float* ent,
                                  void* stream);

/* grad[b, t, v] = (*grad_scale) / t * (grad_logp * (1[v == target] - p_v)
 *                  - grad_entropy * p_v * (log p_v + entropy)), p_v = exp(z_v - lse),
 * in `dtype` (grad_scale a device scalar, or NULL for 1; grad_entropy NULL: no entropy term, and
 * then entropy, the forward's ent, is not read), written with the element strides
 * (grad_stride_b, grad_stride_t, grad_stride_v); rows whose coefficients are all zero get zeros
 * without reading logits.  grad may equal logits (in place, same strides). */
LK_EXPORT int lk_logprobs_backward(const float* grad_logp, const float* grad_scale,
                                   const float* grad_entropy, const float* entropy, const void* logits,
                                   int dtype, int64_t batch, int64_t length, int64_t vocab,
                                   int64_t stride_b, int64_t stride_t, int64_t stride_v,
                                   const int64_t* target, int64_t target_stride_b,
                                   int64_t target_stride_t, const double* lse, float inv_temperature_hi,
                                   float inv_temperature_lo, void* grad, int64_t grad_stride_b,
                                   int64_t grad_stride_t, int64_t grad_stride_v, void* stream);

/* SPEC steps 8-9 on [B*T] fp32 contiguous logp (two-pass path): old (NULL: on-policy, old =
 * logp) and ref (NULL unless cfg->has_ref) fp32 strided; advantages [B] (element stride
 * adv_stride) and weights [B] (the per-token weight of each row in the aggregate) float64.
 * Writes dlogp [B*T] (fp32, 0 where masked) and parts [3, B] float64: each row's weighted loss,
 * clipped-token count and k3 sum. */
LK_EXPORT int lk_token_loss(const float* logp, const float* old, int64_t old_stride_b,
                            int64_t old_stride_t, const uint8_t* live, int64_t live_stride_b,
                            int64_t live_stride_t, const float* ref, int64_t ref_stride_b,
                            int64_t ref_stride_t, const double* advantages, int64_t adv_stride,
                            const double* weights, int64_t batch, int64_t length,
                            const lk_surrogate_config* cfg, float* dlogp, double* parts, void* stream);

/* The one-pass loss: lk_logprobs_forward, lk_token_loss and the gradient of the loss in one
 * kernel.  Writes logp [B*T] (0 where masked), parts [3, B*T] float64 (per position) and, when
 * grad is not NULL, d loss / d logits into grad (may equal logits: in place, same strides). */
LK_EXPORT int lk_fused_loss(const void* logits, int dtype, int64_t batch, int64_t length, int64_t vocab,
                            int64_t stride_b, int64_t stride_t, int64_t stride_v, const int64_t* target,
                            int64_t target_stride_b, int64_t target_stride_t, const uint8_t* live,
                            int64_t live_stride_b, int64_t live_stride_t, const float* old,
                            int64_t old_stride_b, int64_t old_stride_t, const float* ref,
                            int64_t ref_stride_b, int64_t ref_stride_t, const double* advantages,
                            int64_t adv_stride, const double* weights, float inv_temperature_hi,
                            float inv_temperature_lo, const lk_surrogate_config* cfg, void* grad,
                            int64_t grad_stride_b, int64_t grad_stride_t, int64_t grad_stride_v,
                            float* logp, double* parts, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* LENS_KERNELS_CUDA_H_ */
