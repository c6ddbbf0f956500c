// Host emulation of the part of the CUDA runtime that csrc/ uses, so the kernels can run (slowly)
// on a CPU: tests/test_cuda_emulated.py compiles csrc/*.cu with g++ against these headers
// (after turning `kernel<<<grid, threads, 0, stream>>>(args)` into `lk_emu::launch(...)`).
//
// Every block runs its threads as cooperative fibers (ucontext) on one OS thread, so
// __syncthreads and warp shuffles are real rendezvous points: a barrier that not every thread
// of the block (or warp) reaches is reported as a deadlock instead of hanging.  Blocks run one
// after another, so `__shared__` can be plain static storage.  LK_EMU_MAX_BLOCKS caps the grid
// (the kernels' grid-stride loops must then cover every row with fewer blocks).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
};
struct uint4 {
  unsigned x, y, z, w;
};
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9 };
struct cudaFuncAttributes {};

inline dim3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0}, blockDim{1, 1, 1}, gridDim{1, 1, 1};

namespace lk_emu {

inline cudaError_t last_error = cudaSuccess;
constexpr size_t kStackBytes = 128 * 1024;

struct Barrier {
  unsigned expected = 0;
  unsigned arrived = 0;
  std::vector<unsigned> waiting;
};

struct Block {
  std::vector<ucontext_t> contexts;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<char> done;
  std::vector<char> blocked;
  ucontext_t scheduler;
  unsigned current = 0;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> lanes;  // shuffle exchange, one slot per thread
  std::function<void()> body;
};

inline Block* active = nullptr;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "lk_emu: %s (block %u)\n", what, blockIdx.x);
  std::abort();
}

// Arrive at `barrier`; the last thread to arrive releases the others and carries on.
inline void wait(Barrier& barrier) {
  Block& block = *active;
  const unsigned me = block.current;
  if (++barrier.arrived == barrier.expected) {
    barrier.arrived = 0;
    for (unsigned t : barrier.waiting) block.blocked[t] = 0;
    barrier.waiting.clear();
    return;
  }
  barrier.waiting.push_back(me);
  block.blocked[me] = 1;
  swapcontext(&block.contexts[me], &block.scheduler);
}

inline void fiber_entry() {
  active->body();
  active->done[active->current] = 1;  // then back to the scheduler through uc_link
}

inline void run_block(unsigned threads, std::function<void()> body) {
  Block block;
  block.contexts.resize(threads);
  block.done.assign(threads, 0);
  block.blocked.assign(threads, 0);
  block.lanes.assign(threads, 0);
  block.block_barrier.expected = threads;
  block.warp_barriers.resize(threads / 32);
  for (Barrier& warp : block.warp_barriers) warp.expected = 32;
  block.body = std::move(body);
  for (unsigned t = 0; t < threads; ++t) {
    block.stacks.emplace_back(new char[kStackBytes]);
    getcontext(&block.contexts[t]);
    block.contexts[t].uc_stack.ss_sp = block.stacks[t].get();
    block.contexts[t].uc_stack.ss_size = kStackBytes;
    block.contexts[t].uc_link = &block.scheduler;
    makecontext(&block.contexts[t], fiber_entry, 0);
  }
  active = &block;
  for (bool ran = true; ran;) {
    ran = false;
    for (unsigned t = 0; t < threads; ++t) {
      if (block.done[t] || block.blocked[t]) continue;
      block.current = t;
      threadIdx = {t, 0, 0};
      swapcontext(&block.scheduler, &block.contexts[t]);
      ran = true;
    }
  }
  for (unsigned t = 0; t < threads; ++t)
    if (!block.done[t]) fail("deadlock: a thread waits at a barrier the rest of its block or warp never reaches");
  active = nullptr;
}

inline unsigned max_blocks() {
  const char* cap = std::getenv("LK_EMU_MAX_BLOCKS");
  return cap && *cap ? static_cast<unsigned>(std::strtoul(cap, nullptr, 10)) : 0u;
}

template <typename... Params, typename... Args>
void launch(unsigned grid, int threads, void (*kernel)(Params...), Args... args) {
  if (grid == 0 || threads <= 0 || threads > 1024) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (threads % 32 != 0) fail("block size is not a multiple of the warp size");
  std::tuple<Params...> params(static_cast<Params>(args)...);
  const unsigned cap = max_blocks();
  if (cap != 0 && grid > cap) grid = cap;
  gridDim = {grid, 1, 1};
  blockDim = {static_cast<unsigned>(threads), 1, 1};
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx = {b, 0, 0};
    run_block(static_cast<unsigned>(threads), [&] { std::apply(kernel, params); });
  }
}

}  // namespace lk_emu

inline void __syncthreads() { lk_emu::wait(lk_emu::active->block_barrier); }

template <typename V>
inline V __shfl_xor_sync(unsigned, V value, int offset) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "shuffle of a value wider than 64 bits");
  lk_emu::Block& block = *lk_emu::active;
  const unsigned me = block.current, warp = me / 32, lane = me % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(V));
  block.lanes[me] = bits;
  lk_emu::wait(block.warp_barriers[warp]);
  const uint64_t theirs = block.lanes[warp * 32 + (lane ^ static_cast<unsigned>(offset))];
  lk_emu::wait(block.warp_barriers[warp]);
  V out;
  std::memcpy(&out, &theirs, sizeof(V));
  return out;
}

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
// 16-byte accesses must be 16-byte aligned on a GPU; here a misaligned one aborts.
inline void check_alignment(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) lk_emu::fail("misaligned 16-byte vector access");
}
inline uint4 __ldcs(const uint4* p) {
  check_alignment(p);
  return *p;
}
inline void __stcs(uint4* p, uint4 value) {
  check_alignment(p);
  *p = value;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = lk_emu::last_error;
  lk_emu::last_error = cudaSuccess;
  return error;
}
inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "emulated CUDA error";
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
template <typename F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes*, F) {
  return cudaSuccess;
}
