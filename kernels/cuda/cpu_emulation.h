// CUDA's execution model on one CPU thread, so that kernels/cuda/llmint8.cu compiles as C++ and
// runs in every test run without a GPU (written from the CUDA C++ Programming Guide's semantics).
//
// - A grid runs its blocks one after another; a block runs its threads as fibers (ucontext) on
//   this thread, switching only at __syncthreads and warp shuffles, so `__shared__` can be a
//   function-static and threadIdx a global that the scheduler sets before resuming a fiber.
// - __syncthreads: every live thread of the block arrives before any continues.
// - __shfl_xor_sync: the live lanes of a warp exchange values through the block's lane slots.
// - __half / __nv_bfloat16: 16-bit storage with round-to-nearest-even conversions from float.
// - __fdiv_rn / __fmul_rn: IEEE float division and product (built with -ffp-contract=off).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};
inline dim3 gridDim, blockDim, blockIdx, threadIdx;

namespace emulation {

enum class Wait { none, block, warp };

struct Fiber {
  ucontext_t context;
  Wait wait = Wait::none;
  unsigned long generation = 0;
  bool done = false;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0, alive = 0, arrived = 0;
  unsigned long generation = 0;
  std::vector<int> warp_arrived;
  std::vector<unsigned long> warp_generation;
  std::vector<uint64_t> lanes;  // one shuffle slot per thread
  std::function<void()> body;
};

inline Block* running = nullptr;
constexpr size_t kStackBytes = 64 << 10;

inline std::vector<std::vector<char>>& stacks() {
  static std::vector<std::vector<char>> pool;  // reused by every launch
  return pool;
}

inline void suspend(Wait wait, unsigned long generation) {
  Fiber& fiber = running->fibers[running->current];
  fiber.wait = wait;
  fiber.generation = generation;
  swapcontext(&fiber.context, &running->scheduler);
}

inline int alive_in_warp(int warp) {
  int count = 0;
  for (int t = warp * 32; t < warp * 32 + 32 && t < (int)running->fibers.size(); ++t) count += !running->fibers[t].done;
  return count;
}

inline void release_block_if_all_arrived() {
  if (running->arrived > 0 && running->arrived == running->alive) {
    running->arrived = 0;
    ++running->generation;
  }
}

inline void release_warp_if_all_arrived(int warp) {
  if (running->warp_arrived[warp] > 0 && running->warp_arrived[warp] == alive_in_warp(warp)) {
    running->warp_arrived[warp] = 0;
    ++running->warp_generation[warp];
  }
}

inline void syncthreads() {
  const unsigned long generation = running->generation;
  ++running->arrived;
  release_block_if_all_arrived();
  if (running->generation == generation) suspend(Wait::block, generation);
}

inline void syncwarp() {
  const int warp = threadIdx.x / 32;
  const unsigned long generation = running->warp_generation[warp];
  ++running->warp_arrived[warp];
  release_warp_if_all_arrived(warp);
  if (running->warp_generation[warp] == generation) suspend(Wait::warp, generation);
}

inline void fiber_main() {
  running->body();
  running->fibers[running->current].done = true;
  --running->alive;
  release_block_if_all_arrived();
  release_warp_if_all_arrived(running->current / 32);
}  // returns to the scheduler through uc_link

inline bool ready(const Block& block, int t) {
  const Fiber& fiber = block.fibers[t];
  if (fiber.done) return false;
  if (fiber.wait == Wait::block) return block.generation != fiber.generation;
  if (fiber.wait == Wait::warp) return block.warp_generation[t / 32] != fiber.generation;
  return true;
}

inline void run_block(int threads, const std::function<void()>& body) {
  Block block;
  block.fibers.resize(threads);
  block.alive = threads;
  block.warp_arrived.assign((threads + 31) / 32, 0);
  block.warp_generation.assign((threads + 31) / 32, 0);
  block.lanes.assign(threads, 0);
  block.body = body;
  auto& pool = stacks();
  if ((int)pool.size() < threads) pool.resize(threads, std::vector<char>(kStackBytes));
  running = &block;
  for (int t = 0; t < threads; ++t) {
    getcontext(&block.fibers[t].context);
    block.fibers[t].context.uc_stack.ss_sp = pool[t].data();
    block.fibers[t].context.uc_stack.ss_size = kStackBytes;
    block.fibers[t].context.uc_link = &block.scheduler;
    makecontext(&block.fibers[t].context, fiber_main, 0);
  }
  while (block.alive > 0) {
    bool progressed = false;
    for (int t = 0; t < threads; ++t) {
      if (!ready(block, t)) continue;
      block.current = t;
      block.fibers[t].wait = Wait::none;
      threadIdx = {(unsigned)t, 0, 0};
      swapcontext(&block.scheduler, &block.fibers[t].context);
      progressed = true;
    }
    if (!progressed) {
      running = nullptr;
      throw std::runtime_error("deadlock: threads of a block wait at different barriers");
    }
  }
  running = nullptr;
}

// A kernel launch <<<grid, block>>> (1-D, as llmint8.cu uses): the body is the kernel call.
inline void launch(unsigned int grid, unsigned int threads, const std::function<void()>& body) {
  gridDim = {grid, 1, 1};
  blockDim = {threads, 1, 1};
  for (unsigned int b = 0; b < grid; ++b) {
    blockIdx = {b, 0, 0};
    run_block((int)threads, body);
  }
}

}  // namespace emulation

inline void __syncthreads() { emulation::syncthreads(); }

template <typename T>
inline T __shfl_xor_sync(unsigned int /*mask: the kernels pass every lane*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "a shuffle moves at most 8 bytes");
  auto& lanes = emulation::running->lanes;
  const unsigned int me = threadIdx.x, partner = (me & ~31u) | ((me & 31u) ^ (unsigned)lane_mask);
  std::memcpy(&lanes[me], &value, sizeof(T));
  emulation::syncwarp();
  T out = value;
  if (partner < lanes.size()) std::memcpy(&out, &lanes[partner], sizeof(T));
  emulation::syncwarp();  // nobody overwrites a slot before every lane has read it
  return out;
}

inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline uint32_t float_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.bits & 0x8000) << 16, exponent = (h.bits >> 10) & 0x1f, mantissa = h.bits & 0x3ff;
  if (exponent == 0) return bits_float(sign) + (sign ? -1.0f : 1.0f) * std::ldexp((float)mantissa, -24);  // zero or subnormal
  if (exponent == 31) return bits_float(sign | 0x7f800000u | (mantissa << 13));                      // inf or NaN
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline __half __float2half_rn(float v) {
  const uint32_t u = float_bits(v), sign = (u >> 16) & 0x8000, magnitude = u & 0x7fffffff;
  if (magnitude > 0x7f800000u) return {(uint16_t)(sign | 0x7e00)};                  // NaN
  if (magnitude >= 0x477ff000u) return {(uint16_t)(sign | 0x7c00)};                 // >= 65520 rounds to inf
  if (magnitude < 0x38800000u)                                                       // below 2^-14: subnormal or zero
    return {(uint16_t)(sign | (uint32_t)std::nearbyint(std::ldexp(bits_float(magnitude), 24)))};
  uint32_t h = (magnitude >> 13) - (112u << 10);  // rebias the exponent, keep 10 mantissa bits
  const uint32_t rest = magnitude & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;  // to nearest, ties to even (a carry moves the exponent)
  return {(uint16_t)(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 b) { return bits_float((uint32_t)b.bits << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  const uint32_t u = float_bits(v);
  if ((u & 0x7fffffff) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x40)};  // NaN stays a (quiet) NaN
  return {(uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16)};
}
