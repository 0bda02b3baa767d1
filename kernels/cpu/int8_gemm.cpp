// Exact int8 x int8 -> int32 GEMM for CPUs with AVX2 (and a portable scalar path).
//
//   C[i, j] = sum_k A[i, k] * W[j, k]      A: [m, k] int8, W: [n, k] int8 (rows of the weight)
//
// AVX2 has no signed x signed byte product, only vpmaddubsw (u8 x s8 -> pairs summed in s16,
// saturating). With q in [-127, 127] we feed |a| (u8 <= 127) and sign(w, a) (s8): each pair sum
// is at most 2 * 127 * 127 = 32258 < 32767, so it never saturates and the result is exact.
// vpmaddwd with ones then widens the pairs to int32. Where the CPU has AVX512-VNNI, a tile of the
// same shape runs on vpdpbusd instead (64 bytes a step, exact too: see tile_vnni); the AVX2 tile
// reads W from memory at 6.8 GB/s in a decode step of SmolLM2, the VNNI one at 9.5 (one Zen 4 core).
// The kernel keeps 2 rows of A x 4 rows of W in registers (the VNNI one, for a decoded batch, 8 x 2
// or 4 x 4); W is walked in blocks that stay in L2 while every row of A passes over them, and
// prefetched in software a tile ahead as one stream (decode sizes wait on memory).
// Threads split the output columns through at::parallel_for (torch's own thread pool).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amx_gemm.h"
#include "attention.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlockN = 32;  // rows of W per block: 32 x k bytes stay in L2
constexpr int64_t kLoopColumns = 8;  // up to this many 16-bit columns the epilogue multiplies them itself
constexpr int64_t kLoopRows = 4;  // ... and any number of them for sequences this short (decoding): torch's GEMM reorders W at every call
constexpr int64_t kWideColumns = 64;  // ... or this many on longer ones: a GEMM writes [rows, n] in float32 first (an int8 LM head's 49152 columns: 100 MB at 512 rows)
constexpr int64_t kParallelRows = 16;  // the activation side splits a sequence of more rows than this over threads
constexpr int64_t kRun = 8;  // rows the epilogue finishes together: a run shares each read of W's 16-bit columns
constexpr int64_t kEpilogueColumns = 64;  // the narrowest column tile the epilogue splits a row into
constexpr int64_t kWholeProductBytes = int64_t(32) << 20;  // int32 sums of a oneDNN product that may go through memory whole ...
constexpr int64_t kProductChunkBytes = int64_t(2) << 20;  // ... else chunks of this many, finished by the epilogue while in L2
constexpr int64_t kMinProductChunk = 256;  // columns: narrower products run oneDNN below its rate
constexpr int64_t kParallelWork = int64_t(1) << 16;  // multiply-adds below which splitting the columns costs more than it saves

inline int32_t dot_scalar(const int8_t* a, const int8_t* w, int64_t from, int64_t k) {
  int32_t s = 0;
  for (int64_t t = from; t < k; ++t) s += int32_t(a[t]) * int32_t(w[t]);
  return s;
}

#if defined(__AVX2__)
inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// acc += sum over 32 bytes of a * w, exactly, as 8 int32 lanes.
inline __m256i dot32(__m256i acc, __m256i abs_a, __m256i a, __m256i w, __m256i ones) {
  const __m256i pairs = _mm256_maddubs_epi16(abs_a, _mm256_sign_epi8(w, a));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
}

// C[rows MR of A, rows NR of W] for one tile.
template <int MR, int NR>
inline void tile(const int8_t* a, const int8_t* w, int32_t* c, int64_t k, int64_t ldc) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm256_setzero_si256();
  const int64_t k32 = k & ~int64_t(31);
  for (int64_t t = 0; t < k32; t += 32) {
    __m256i av[MR], abs_av[MR];
    for (int r = 0; r < MR; ++r) {
      av[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + r * k + t));
      abs_av[r] = _mm256_abs_epi8(av[r]);
    }
    // The next tile's rows, as many bytes per step as this one reads: W (contiguous) streams from
    // memory as one sequence a tile ahead. An address, never dereferenced: past the end is harmless.
    const uintptr_t next = reinterpret_cast<uintptr_t>(w) + NR * k + t * NR;
    for (int64_t b = 0; b < NR * 32; b += 64) _mm_prefetch(reinterpret_cast<const char*>(next + b), _MM_HINT_T0);
    for (int j = 0; j < NR; ++j) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * k + t));
      for (int r = 0; r < MR; ++r) acc[r][j] = dot32(acc[r][j], abs_av[r], av[r], wv, ones);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j)
      c[r * ldc + j] = hsum(acc[r][j]) + dot_scalar(a + r * k, w + j * k, k32, k);
}

#endif

#if defined(__GNUC__) && defined(__x86_64__)
#define LLMINT8_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

// The same tile with AVX512-VNNI, 64 bytes a step: vpdpbusd multiplies u8 by s8 and adds each 4
// products to an int32 without saturating, so a feeds in as a + 128 (u8 in [1, 255]) and the sum
// sheds 128 * sum(w), which the same instruction counts with ones: exact for any k below 2^16.
// The row tails load through a mask (0 bytes beyond k: products of 0).
// (GCC keeps a copy of acc on the stack here, stored at every step; unrolling every loop over the
// tile keeps it in registers, and measured 0.8-0.9x at 1-2 rows, which wait on memory anyway.)
template <int MR, int NR>
LLMINT8_VNNI inline void tile_vnni(const int8_t* a, const int8_t* w, int32_t* c, int64_t k, int64_t ldc) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), ones = _mm512_set1_epi8(1);
  __m512i acc[MR][NR], w_sum[NR];
  for (int j = 0; j < NR; ++j) {
    w_sum[j] = _mm512_setzero_si512();
    for (int r = 0; r < MR; ++r) acc[r][j] = _mm512_setzero_si512();
  }
  for (int64_t t = 0; t < k; t += 64) {
    const __mmask64 mask = k - t >= 64 ? ~__mmask64(0) : (__mmask64(1) << (k - t)) - 1;
    const uintptr_t next = reinterpret_cast<uintptr_t>(w) + NR * k + t * NR;  // as in `tile`: the next tile's rows, one stream
    for (int64_t b = 0; b < NR * 64; b += 64) _mm_prefetch(reinterpret_cast<const char*>(next + b), _MM_HINT_T0);
    __m512i au[MR];
    for (int r = 0; r < MR; ++r) au[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, a + r * k + t), flip);
    for (int j = 0; j < NR; ++j) {
      const __m512i wv = _mm512_maskz_loadu_epi8(mask, w + j * k + t);
      w_sum[j] = _mm512_dpbusd_epi32(w_sum[j], ones, wv);
      for (int r = 0; r < MR; ++r) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], au[r], wv);
    }
  }
  for (int j = 0; j < NR; ++j) {
    const int32_t shift = 128 * _mm512_reduce_add_epi32(w_sum[j]);
    for (int r = 0; r < MR; ++r) c[r * ldc + j] = _mm512_reduce_add_epi32(acc[r][j]) - shift;
  }
}

// Sixteen int32 vectors -> one vector whose lane l is the sum of v[l]'s lanes: 45 instructions for
// the 16 sums, where one reduction each takes ~8.
LLMINT8_VNNI __attribute__((always_inline)) inline __m512i sum_lanes16(const __m512i* v) {
  __m512i pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)  // each 128-bit block: [v2i, v2i+1, v2i, v2i+1] partial sums
    pairs[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // each block: [v4i .. v4i+3] partial sums
    quads[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(pairs[2 * i], pairs[2 * i + 1]), _mm512_unpackhi_epi64(pairs[2 * i], pairs[2 * i + 1]));
  const __m512i low = _mm512_add_epi32(_mm512_shuffle_i32x4(quads[0], quads[1], 0x44), _mm512_shuffle_i32x4(quads[0], quads[1], 0xEE));
  const __m512i high = _mm512_add_epi32(_mm512_shuffle_i32x4(quads[2], quads[3], 0x44), _mm512_shuffle_i32x4(quads[2], quads[3], 0xEE));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(low, high, 0x88), _mm512_shuffle_i32x4(low, high, 0xDD));  // block b: v4b .. v4b+3
}

// tile_vnni for a decoded batch: MR x NR = 16 sums, so that each row of W read from memory serves
// 4 or 8 rows of A (the 2-row tile reads a block of W from L2 once per pair of rows and sums W once
// per pair: at 8 rows it streamed W at 35-45 % of the 1-row tile's rate), and the 16 sums are
// reduced together (sum_lanes16).
template <int MR, int NR>
LLMINT8_VNNI inline void tile_vnni16(const int8_t* a, const int8_t* w, int32_t* c, int64_t k, int64_t ldc) {
  static_assert(MR * NR == 16, "one sum per lane of a vector");
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), ones = _mm512_set1_epi8(1);
  __m512i acc[MR * NR], w_sum[NR];
  for (int j = 0; j < NR; ++j) w_sum[j] = _mm512_setzero_si512();
  for (int s = 0; s < MR * NR; ++s) acc[s] = _mm512_setzero_si512();
  for (int64_t t = 0; t < k; t += 64) {
    const __mmask64 mask = k - t >= 64 ? ~__mmask64(0) : (__mmask64(1) << (k - t)) - 1;
    const uintptr_t next = reinterpret_cast<uintptr_t>(w) + NR * k + t * NR;
    for (int64_t b = 0; b < NR * 64; b += 64) _mm_prefetch(reinterpret_cast<const char*>(next + b), _MM_HINT_T0);
    __m512i wv[NR];
    #pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      wv[j] = _mm512_maskz_loadu_epi8(mask, w + j * k + t);
      w_sum[j] = _mm512_dpbusd_epi32(w_sum[j], ones, wv[j]);
    }
    #pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i au = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, a + r * k + t), flip);
      #pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[r * NR + j] = _mm512_dpbusd_epi32(acc[r * NR + j], au, wv[j]);
    }
  }
  __m512i done[MR * NR], w_done[NR];  // copies: with acc's address taken (sum_lanes16), GCC would store acc to the stack at every step
  #pragma GCC unroll 16
  for (int s = 0; s < MR * NR; ++s) done[s] = acc[s];
  for (int j = 0; j < NR; ++j) w_done[j] = w_sum[j];
  alignas(64) int32_t sums[16];
  _mm512_store_si512(sums, sum_lanes16(done));
  int32_t shift[NR];
  for (int j = 0; j < NR; ++j) shift[j] = 128 * _mm512_reduce_add_epi32(w_done[j]);
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) c[r * ldc + j] = sums[r * NR + j] - shift[j];
}

LLMINT8_VNNI void gemm_block_vnni(const int8_t* A, const int8_t* W, int32_t* C, int64_t m, int64_t k, int64_t n, int64_t j0, int64_t j1) {
  int64_t i = 0;
  for (; i + 8 <= m; i += 8) {
    int64_t j = j0;
    for (; j + 2 <= j1; j += 2) tile_vnni16<8, 2>(A + i * k, W + j * k, C + i * n + j, k, n);
    for (; j < j1; ++j)
      for (int64_t r = i; r < i + 8; r += 2) tile_vnni<2, 1>(A + r * k, W + j * k, C + r * n + j, k, n);
  }
  for (; i + 4 <= m; i += 4) {
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) tile_vnni16<4, 4>(A + i * k, W + j * k, C + i * n + j, k, n);
    for (; j < j1; ++j)
      for (int64_t r = i; r < i + 4; r += 2) tile_vnni<2, 1>(A + r * k, W + j * k, C + r * n + j, k, n);
  }
  for (; i + 2 <= m; i += 2) {
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) tile_vnni<2, 4>(A + i * k, W + j * k, C + i * n + j, k, n);
    for (; j < j1; ++j) tile_vnni<2, 1>(A + i * k, W + j * k, C + i * n + j, k, n);
  }
  for (; i < m; ++i) {
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) tile_vnni<1, 4>(A + i * k, W + j * k, C + i * n + j, k, n);
    for (; j < j1; ++j) tile_vnni<1, 1>(A + i * k, W + j * k, C + i * n + j, k, n);
  }
}

bool vnni_here() {
  static const bool here = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
  return here;
}
#else
bool vnni_here() { return false; }
#endif

// C[:, j0:j1] with the VNNI tile where the CPU has it and `vnni` allows (the AVX2 tile stays testable there).
void gemm_block(const int8_t* A, const int8_t* W, int32_t* C, int64_t m, int64_t k, int64_t n,
                int64_t j0, int64_t j1, bool vnni = true) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (vnni && vnni_here() && k < (int64_t(1) << 16)) return gemm_block_vnni(A, W, C, m, k, n, j0, j1);
#endif
#if defined(__AVX2__)
  int64_t i = 0;
  for (; i + 2 <= m; i += 2) {
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) tile<2, 4>(A + i * k, W + j * k, C + i * n + j, k, n);
    for (; j < j1; ++j) tile<2, 1>(A + i * k, W + j * k, C + i * n + j, k, n);
  }
  for (; i < m; ++i) {
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) tile<1, 4>(A + i * k, W + j * k, C + i * n + j, k, n);
    for (; j < j1; ++j) tile<1, 1>(A + i * k, W + j * k, C + i * n + j, k, n);
  }
#else
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = j0; j < j1; ++j) C[i * n + j] = dot_scalar(A + i * k, W + j * k, 0, k);
#endif
}

}  // namespace

// a: [m, k] int8 contiguous, w: [n, k] int8 contiguous -> [m, n] int32.
torch::Tensor int8_gemm(torch::Tensor a, torch::Tensor w, bool vnni) {
  TORCH_CHECK(a.dtype() == torch::kInt8 && w.dtype() == torch::kInt8, "int8_gemm: int8 inputs expected");
  TORCH_CHECK(a.dim() == 2 && w.dim() == 2 && a.size(1) == w.size(1), "int8_gemm: shapes [m, k] and [n, k] expected");
  TORCH_CHECK(a.is_contiguous() && w.is_contiguous(), "int8_gemm: contiguous inputs expected");
  const int64_t m = a.size(0), k = a.size(1), n = w.size(0);
  auto c = torch::empty({m, n}, a.options().dtype(torch::kInt32));
  const int8_t* A = a.data_ptr<int8_t>();
  const int8_t* W = w.data_ptr<int8_t>();
  int32_t* C = c.data_ptr<int32_t>();
  at::parallel_for(0, (n + kBlockN - 1) / kBlockN, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      gemm_block(A, W, C, m, k, n, b * kBlockN, std::min(n, (b + 1) * kBlockN), vnni);
  });
  return c;
}

// The activation side runs LANES columns at a time: 16 with AVX-512, 8 with AVX2, 1 without.
// Every lane type gives the same float32 operations as the scalar code (abs, compare, max,
// multiply, round half to even, clamp), so all three are bit-identical to the torch reference.
struct ScalarLanes {
  static constexpr int64_t kWidth = 1;
  using F = float;
  template <typename T>
  static F load(const T* p) { return static_cast<float>(*p); }
  static void mark(int32_t* hit, F v, float limit) { *hit |= !(std::fabs(v) < limit) ? -1 : 0; }
  static F zero() { return 0.0f; }
  static F splat(float s) { return s; }
  static F times(F a, F b) { return a * b; }
  static F plus(F v, const float* p) { return v + *p; }
  static F mul(F v, const float* m) { return v * *m; }
  static F add_product(F s, float x, F w) { return s + x * w; }  // multiply, then add: never fused
  static F only_kept(F v, const int32_t* keep) { return *keep ? v : 0.0f; }
  static void store(float* p, F v) { *p = v; }
  static F max_kept(F best, F v, const int32_t* keep) { return *keep ? std::max(best, std::fabs(v)) : best; }
  static float reduce_max(F v) { return v; }
  static void store_q(int8_t* out, F v, float inv, const int32_t* keep) {
    const float r = *keep ? std::nearbyint(v * inv) : 0.0f;
    *out = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
  }
};

#if defined(__AVX2__)
struct Avx2Lanes {
  static constexpr int64_t kWidth = 8;
  using F = __m256;
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load(const int32_t* p) { return _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static F load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F load(const c10::BFloat16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static F load(const double* p) {  // narrowed one by one, as the scalar path does
    alignas(32) float lanes[8];
    for (int j = 0; j < 8; ++j) lanes[j] = static_cast<float>(p[j]);
    return _mm256_load_ps(lanes);
  }
  static F absolute(F v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
  static F kept(const int32_t* keep) { return _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keep))); }
  static void mark(int32_t* hit, F v, float limit) {  // !(|x| < limit): NaN and Inf too
    float* h = reinterpret_cast<float*>(hit);
    _mm256_storeu_ps(h, _mm256_or_ps(_mm256_loadu_ps(h), _mm256_cmp_ps(absolute(v), _mm256_set1_ps(limit), _CMP_NLT_UQ)));
  }
  static F zero() { return _mm256_setzero_ps(); }
  static F splat(float s) { return _mm256_set1_ps(s); }
  static F times(F a, F b) { return _mm256_mul_ps(a, b); }
  static F plus(F v, const float* p) { return _mm256_add_ps(v, _mm256_loadu_ps(p)); }
  static F mul(F v, const float* m) { return _mm256_mul_ps(v, _mm256_loadu_ps(m)); }
  static F add_product(F s, float x, F w) { return _mm256_add_ps(s, _mm256_mul_ps(_mm256_set1_ps(x), w)); }
  static F only_kept(F v, const int32_t* keep) { return _mm256_and_ps(v, kept(keep)); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F max_kept(F best, F v, const int32_t* keep) { return _mm256_max_ps(best, _mm256_and_ps(absolute(v), kept(keep))); }
  static float reduce_max(F v) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, v);
    return *std::max_element(lanes, lanes + 8);
  }
  static void store_q(int8_t* out, F v, float inv, const int32_t* keep) {
    F r = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(inv)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_and_ps(_mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-127.0f), r)), kept(keep));
    const __m256i q32 = _mm256_cvtps_epi32(r);
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q32), _mm256_extracti128_si256(q32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packs_epi16(q16, q16));
  }
};
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
struct Avx512Lanes {
  static constexpr int64_t kWidth = 16;
  using F = __m512;
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load(const int32_t* p) { return _mm512_cvtepi32_ps(_mm512_loadu_si512(p)); }
  static F load(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static F load(const c10::BFloat16* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static F load(const double* p) {  // narrowed one by one, as the scalar path does
    alignas(64) float lanes[16];
    for (int j = 0; j < 16; ++j) lanes[j] = static_cast<float>(p[j]);
    return _mm512_load_ps(lanes);
  }
  static F absolute(F v) { return _mm512_castsi512_ps(_mm512_andnot_si512(_mm512_castps_si512(_mm512_set1_ps(-0.0f)), _mm512_castps_si512(v))); }
  static __m512i kept(const int32_t* keep) { return _mm512_loadu_si512(keep); }
  static void mark(int32_t* hit, F v, float limit) {
    const __mmask16 flag = _mm512_cmp_ps_mask(absolute(v), _mm512_set1_ps(limit), _CMP_NLT_UQ);
    _mm512_mask_storeu_epi32(hit, flag, _mm512_set1_epi32(-1));
  }
  static F zero() { return _mm512_setzero_ps(); }
  static F splat(float s) { return _mm512_set1_ps(s); }
  static F times(F a, F b) { return _mm512_mul_ps(a, b); }
  static F plus(F v, const float* p) { return _mm512_add_ps(v, _mm512_loadu_ps(p)); }
  static F mul(F v, const float* m) { return _mm512_mul_ps(v, _mm512_loadu_ps(m)); }
  static F add_product(F s, float x, F w) { return _mm512_add_ps(s, _mm512_mul_ps(_mm512_set1_ps(x), w)); }
  static F only_kept(F v, const int32_t* keep) { return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), kept(keep))); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F max_kept(F best, F v, const int32_t* keep) {
    return _mm512_max_ps(best, _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(absolute(v)), kept(keep))));
  }
  static float reduce_max(F v) { return _mm512_reduce_max_ps(v); }
  static void store_q(int8_t* out, F v, float inv, const int32_t* keep) {
    F r = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(inv)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_min_ps(_mm512_set1_ps(127.0f), _mm512_max_ps(_mm512_set1_ps(-127.0f), r));
    const __m512i q32 = _mm512_and_si512(_mm512_cvtps_epi32(r), kept(keep));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(q32));
  }
};
using WideLanes = Avx512Lanes;
#elif defined(__AVX2__)
using WideLanes = Avx2Lanes;
#else
using WideLanes = ScalarLanes;
#endif

// Row-wise absmax quantization fused with outlier detection (LLM.int8()'s activation side), into
// caller buffers: x [m, k] of type T; M [k] holds the excluded columns (stored outliers) on entry
// and every 16-bit column of this call on exit: |x| >= limit, NaN or Inf anywhere in the column.
// 16-bit columns are 0 in Q and do not enter the row absmax. Rounding and the scale are the
// reference's: inv = 127 / absmax (0 when absmax == 0), q = round_half_even(x * inv),
// S = absmax / 127. Both passes split the rows over threads; L lanes at a time, tails scalar.
// With SM (llm.int8-smooth's m [k], else null) every value read is x * m in float32, as the
// reference's smooth_activations computes it: smoothing costs no pass of its own.
template <typename L, typename T>
inline typename L::F read(const T* row, const float* SM, int64_t t) {
  return SM != nullptr ? L::mul(L::load(row + t), SM + t) : L::load(row + t);
}

// Pass 1: M [k] gains every column of x [m, k] (x * m with SM) holding |x| >= limit, NaN or Inf;
// each block of rows ORs its flags into its own int32 row, merged afterwards.
template <typename L, typename T>
void mark_columns(const T* X, int64_t m, int64_t k, float limit, bool* M, const float* SM) {
  using Tail = ScalarLanes;
  const int64_t wide = k - k % L::kWidth;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(m, at::get_num_threads()));
  std::vector<int32_t> hits(blocks * k, 0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int32_t* hit = hits.data() + b * k;
      for (int64_t i = b * m / blocks; i < (b + 1) * m / blocks; ++i) {
        const T* row = X + i * k;
        for (int64_t t = 0; t < wide; t += L::kWidth) L::mark(hit + t, read<L>(row, SM, t), limit);
        for (int64_t t = wide; t < k; ++t) Tail::mark(hit + t, read<Tail>(row, SM, t), limit);
      }
    }
  });
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t t = 0; t < k; ++t) M[t] = M[t] || hits[b * k + t] != 0;
}

// Pass 2 for one row: absmax over the kept columns (keep: all bits set; an AND zeroes the others,
// NaN included), then the int8 values and the row's scale.
template <typename L, typename T>
void quantize_row(const T* row, int64_t k, const int32_t* keep, const float* SM, int8_t* out, float* S) {
  using Tail = ScalarLanes;
  const int64_t wide = k - k % L::kWidth;
  typename L::F best = L::zero();
  for (int64_t t = 0; t < wide; t += L::kWidth) best = L::max_kept(best, read<L>(row, SM, t), keep + t);
  float absmax = L::reduce_max(best);
  for (int64_t t = wide; t < k; ++t) absmax = Tail::max_kept(absmax, read<Tail>(row, SM, t), keep + t);
  const float inv = absmax > 0.0f ? 127.0f / absmax : 0.0f;
  for (int64_t t = 0; t < wide; t += L::kWidth) L::store_q(out + t, read<L>(row, SM, t), inv, keep + t);
  for (int64_t t = wide; t < k; ++t) Tail::store_q(out + t, read<Tail>(row, SM, t), inv, keep + t);
  *S = absmax / 127.0f;
}

template <typename L, typename T>
void quantize_rows_with(const T* X, int64_t m, int64_t k, float limit, bool* M, int8_t* Q, float* S, const float* SM) {
  mark_columns<L>(X, m, k, limit, M, SM);
  std::vector<int32_t> keep(k);
  for (int64_t t = 0; t < k; ++t) keep[t] = M[t] ? 0 : -1;
  at::parallel_for(0, m, kParallelRows, [&](int64_t r0, int64_t r1) {  // the row stays in cache
    for (int64_t i = r0; i < r1; ++i) quantize_row<L>(X + i * k, k, keep.data(), SM, Q + i * k, S + i);
  });
}

// llm.int8-rotate's activation side: columns marked as above, then per row X'R (the marked
// columns set to 0, times the block-diagonal Hadamard R of reference.rotation_blocks) in a
// buffer, quantized row-wise. The butterflies (a + b, a - b, stage by stage) and the final
// power-of-2 scale are the reference's operations in its order, so the bits are the same.
std::vector<std::pair<int64_t, int64_t>> rotation_blocks(int64_t k, int64_t block) {
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (start, size): `block` wide while it fits, then smaller powers of 4
  for (int64_t start = 0, size = block; start < k; start += size) {
    while (size > k - start) size /= 4;
    blocks.emplace_back(start, size);
  }
  return blocks;
}

#if defined(__AVX2__)
// One butterfly stage within 8 lanes: the lane with the lower index of each pair gets a + b, the
// other a - b, where `partner` holds each lane's pair element (the same operands as the scalar).
template <int UpperLanes>  // a template argument: the blend mask must be a compile-time constant
inline __m256 butterfly_lanes(__m256 v, __m256 partner) {
  return _mm256_blend_ps(_mm256_add_ps(v, partner), _mm256_sub_ps(partner, v), UpperLanes);
}
#endif

void hadamard(float* v, int64_t size) {
  int64_t half = 1;
#if defined(__AVX2__)
  if (size % 8 == 0) {  // the stages of half 1, 2 and 4 in registers, 8 lanes at a time
    for (int64_t j = 0; j < size; j += 8) {
      __m256 x = _mm256_loadu_ps(v + j);
      x = butterfly_lanes<0xAA>(x, _mm256_permute_ps(x, 0xB1));
      x = butterfly_lanes<0xCC>(x, _mm256_permute_ps(x, 0x4E));
      x = butterfly_lanes<0xF0>(x, _mm256_permute2f128_ps(x, x, 0x01));
      _mm256_storeu_ps(v + j, x);
    }
    // two stages per pass over the block (pairs half apart, then 2 * half apart, each sum and
    // difference the reference's own), then a last single stage where the count is odd
    for (half = 8; 4 * half <= size; half *= 4)
      for (int64_t j0 = 0; j0 < size; j0 += 4 * half)
        for (int64_t j = j0; j < j0 + half; j += 8) {
          const __m256 a = _mm256_loadu_ps(v + j), b = _mm256_loadu_ps(v + j + half);
          const __m256 c = _mm256_loadu_ps(v + j + 2 * half), d = _mm256_loadu_ps(v + j + 3 * half);
          const __m256 ab = _mm256_add_ps(a, b), a_b = _mm256_sub_ps(a, b), cd = _mm256_add_ps(c, d), c_d = _mm256_sub_ps(c, d);
          _mm256_storeu_ps(v + j, _mm256_add_ps(ab, cd));
          _mm256_storeu_ps(v + j + half, _mm256_add_ps(a_b, c_d));
          _mm256_storeu_ps(v + j + 2 * half, _mm256_sub_ps(ab, cd));
          _mm256_storeu_ps(v + j + 3 * half, _mm256_sub_ps(a_b, c_d));
        }
    for (; half < size; half *= 2)
      for (int64_t j0 = 0; j0 < size; j0 += 2 * half)
        for (int64_t j = j0; j < j0 + half; j += 8) {
          const __m256 a = _mm256_loadu_ps(v + j), b = _mm256_loadu_ps(v + j + half);
          _mm256_storeu_ps(v + j, _mm256_add_ps(a, b));
          _mm256_storeu_ps(v + j + half, _mm256_sub_ps(a, b));
        }
  }
#endif
  for (; half < size; half *= 2)
    for (int64_t j0 = 0; j0 < size; j0 += 2 * half)
      for (int64_t j = j0; j < j0 + half; ++j) {
        const float a = v[j], b = v[j + half];
        v[j] = a + b;
        v[j + half] = a - b;
      }
  int64_t root = 1;
  while (root * root < size) root *= 2;
  const float scale = 1.0f / static_cast<float>(root);  // exact: size is a power of 4
  for (int64_t j = 0; j < size; ++j) v[j] *= scale;
}

template <typename L, typename T>
void quantize_rotated_with(const T* X, int64_t m, int64_t k, float limit, bool* M, int8_t* Q, float* S, int64_t block) {
  mark_columns<L>(X, m, k, limit, M, nullptr);
  const auto blocks = rotation_blocks(k, block);
  using Tail = ScalarLanes;
  const int64_t wide = k - k % L::kWidth;
  const std::vector<int32_t> keep(k, -1);
  std::vector<int32_t> unmarked(k);  // all bits set where the column stays int8, 0 where it is 16-bit
  for (int64_t t = 0; t < k; ++t) unmarked[t] = M[t] ? 0 : -1;
  at::parallel_for(0, m, kParallelRows, [&](int64_t r0, int64_t r1) {
    std::vector<float> v(k);
    for (int64_t i = r0; i < r1; ++i) {
      const T* row = X + i * k;
      for (int64_t t = 0; t < wide; t += L::kWidth) L::store(v.data() + t, L::only_kept(L::load(row + t), unmarked.data() + t));
      for (int64_t t = wide; t < k; ++t) Tail::store(v.data() + t, Tail::only_kept(Tail::load(row + t), unmarked.data() + t));
      for (const auto& [start, size] : blocks) hadamard(v.data() + start, size);
      quantize_row<L>(v.data(), k, keep.data(), nullptr, Q + i * k, S + i);
    }
  });
}

// The lane widths this build has, widest first; the parity tests run each against the reference.
std::vector<int64_t> lane_widths() {
  std::vector<int64_t> widths;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  widths.push_back(Avx512Lanes::kWidth);
#endif
#if defined(__AVX2__)
  widths.push_back(Avx2Lanes::kWidth);
#endif
  widths.push_back(ScalarLanes::kWidth);
  return widths;
}

template <typename T>
void quantize_rows_into(const T* X, int64_t m, int64_t k, float limit, bool* M, int8_t* Q, float* S, const float* SM = nullptr,
                        int64_t lanes = WideLanes::kWidth) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (lanes == Avx512Lanes::kWidth) return quantize_rows_with<Avx512Lanes, T>(X, m, k, limit, M, Q, S, SM);
#endif
#if defined(__AVX2__)
  if (lanes == Avx2Lanes::kWidth) return quantize_rows_with<Avx2Lanes, T>(X, m, k, limit, M, Q, S, SM);
#endif
  TORCH_CHECK(lanes == ScalarLanes::kWidth, "this build has no ", lanes, "-lane activation kernel");
  quantize_rows_with<ScalarLanes, T>(X, m, k, limit, M, Q, S, SM);
}

void check_rows(const torch::Tensor& x, const torch::Tensor& exclude) {
  TORCH_CHECK(x.is_floating_point() && x.dim() == 2 && x.is_contiguous(), "contiguous floating-point [m, k] input expected");
  TORCH_CHECK(exclude.dtype() == torch::kBool && exclude.numel() == x.size(1), "bool [k] column mask expected");
}

// Row-wise absmax quantization fused with outlier detection (LLM.int8()'s activation side).
//   x: [m, k] float32, exclude: [k] bool (columns already taken out, e.g. stored outliers),
//   threshold: |x| >= threshold (or NaN/Inf) marks a column as an outlier in this call.
// Returns (q int8 [m, k], scale float32 [m], outlier bool [k]). Outlier and excluded columns are
// 0 in q and do not enter the row absmax. Rounding and the scale formula are the reference's:
//   inv = 127 / absmax (0 when absmax == 0), q = round_half_even(x * inv), scale = absmax / 127.
std::vector<torch::Tensor> quantize_rows(torch::Tensor x, torch::Tensor exclude, double threshold, int64_t lanes) {
  check_rows(x, exclude);
  const int64_t m = x.size(0), k = x.size(1);
  auto mask = exclude.contiguous().clone();
  auto q = torch::empty({m, k}, x.options().dtype(torch::kInt8));
  auto scale = torch::empty({m}, x.options().dtype(torch::kFloat32));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_rows", [&] {
    quantize_rows_into<scalar_t>(x.data_ptr<scalar_t>(), m, k, static_cast<float>(threshold), mask.data_ptr<bool>(), q.data_ptr<int8_t>(), scale.data_ptr<float>(), nullptr, lanes);
  });
  return {q, scale, mask};
}

// Runs quantize_group(g) for each of `groups` sequences of `rows` rows. Short sequences (a batch
// being decoded) run side by side, one per thread, their own parallel_for then inline: a parallel
// region per sequence costs more than its rows. Longer ones each split their rows over the threads.
template <typename F>
void for_each_group(int64_t groups, int64_t rows, const F& quantize_group) {
  if (rows > kParallelRows) {
    for (int64_t g = 0; g < groups; ++g) quantize_group(g);
    return;
  }
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) quantize_group(g);
  });
}

// quantize_rotated_sequences: as quantize_sequences, for llm.int8-rotate: q holds X'R of each
// group (its 16-bit columns set to 0 before the rotation), sx its row scales.
// Returns q, the row scales, each sequence's 16-bit columns, and how many of those are outliers of
// one sequence only (not stored): the caller's extra work, almost always none once calibrated.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, int64_t> quantize_rotated_sequences(torch::Tensor x, torch::Tensor stored_mask, double threshold,
                                                                                          int64_t groups, int64_t block) {
  check_rows(x, stored_mask);
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(groups >= 1 && m % groups == 0, "rows must split into equal groups");
  TORCH_CHECK(block >= 1 && (block & (block - 1)) == 0 && __builtin_ctzll(block) % 2 == 0, "the rotation block must be a power of 4");
  const int64_t rows = m / groups;
  auto q = torch::empty({m, k}, x.options().dtype(torch::kInt8));
  auto sx = torch::empty({m}, x.options().dtype(torch::kFloat32));
  auto masks = torch::empty({groups, k}, x.options().dtype(torch::kBool));
  const auto stored_c = stored_mask.contiguous();
  const bool* stored = stored_c.data_ptr<bool>();
  bool* M = masks.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_rotated_sequences", [&] {
    for_each_group(groups, rows, [&](int64_t g) {
      std::copy(stored, stored + k, M + g * k);
      quantize_rotated_with<WideLanes, scalar_t>(x.data_ptr<scalar_t>() + g * rows * k, rows, k, static_cast<float>(threshold), M + g * k,
                                                 q.data_ptr<int8_t>() + g * rows * k, sx.data_ptr<float>() + g * rows, block);
    });
  });
  int64_t runtime_only = 0;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t t = 0; t < k; ++t) runtime_only += M[g * k + t] && !stored[t];
  return {q, sx, masks, runtime_only};
}

// The row-wise linear (llm.int8, vectorwise, rowwise, rowwise+decomp) in two calls around the
// int8 GEMM, which the caller runs through the fastest path of the machine (cpu_kernels.py):
//   Y = (acc * (sx ⊗ sw)) + X[:, O] W[:, O]^T + bias, in float32, for x [m, k].
// The m rows are `groups` sequences of m / groups rows; each finds its own outlier columns O_g
// (the reference calls the linear once per sequence). One int8 GEMM serves all of them.
//
// Smoothing methods pass smooth (m, float32 [k]): both calls then read x * m, as the reference's
// smooth_activations(x) would give it, without writing that product anywhere.
//
// quantize_sequences: x [m, k] and stored_mask [k] (the stored outlier columns) ->
//   (q int8 [m, k], sx float32 [m], masks bool [groups, k]: the 16-bit columns of each group).
const float* smooth_data(const c10::optional<torch::Tensor>& smooth, int64_t k) {
  if (!smooth.has_value()) return nullptr;
  TORCH_CHECK(smooth->dtype() == torch::kFloat32 && smooth->is_contiguous() && smooth->numel() == k, "contiguous float32 [k] smoothing vector expected");
  return smooth->data_ptr<float>();
}

std::vector<torch::Tensor> quantize_sequences(torch::Tensor x, torch::Tensor stored_mask, double threshold, int64_t groups,
                                              c10::optional<torch::Tensor> smooth) {
  check_rows(x, stored_mask);
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(groups >= 1 && m % groups == 0, "rows must split into equal groups");
  const int64_t rows = m / groups;
  auto q = torch::empty({m, k}, x.options().dtype(torch::kInt8));
  auto sx = torch::empty({m}, x.options().dtype(torch::kFloat32));
  auto masks = torch::empty({groups, k}, x.options().dtype(torch::kBool));
  const auto stored_c = stored_mask.contiguous();  // kept alive: a temporary's pointer would dangle
  const bool* stored = stored_c.data_ptr<bool>();
  bool* M = masks.data_ptr<bool>();
  const float* SM = smooth_data(smooth, k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_sequences", [&] {
    for_each_group(groups, rows, [&](int64_t g) {
      std::copy(stored, stored + k, M + g * k);
      quantize_rows_into<scalar_t>(x.data_ptr<scalar_t>() + g * rows * k, rows, k, static_cast<float>(threshold), M + g * k,
                                   q.data_ptr<int8_t>() + g * rows * k, sx.data_ptr<float>() + g * rows, SM);
    });
  });
  return {q, sx, masks};
}

// A row of float32 results in the output dtype, rounded to nearest even as c10's conversions
// round; written so that the compiler vectorizes the bf16 case, and with F16C for fp16.
template <typename T>
void store_row(T* y, const float* v, int64_t n) {
  for (int64_t col = 0; col < n; ++col) y[col] = static_cast<T>(v[col]);
}
template <>
void store_row<c10::BFloat16>(c10::BFloat16* y, const float* v, int64_t n) {
  uint16_t* out = reinterpret_cast<uint16_t*>(y);
  for (int64_t col = 0; col < n; ++col) {
    uint32_t u;
    std::memcpy(&u, v + col, sizeof(u));
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    out[col] = v[col] != v[col] ? uint16_t(0x7FC0) : rounded;  // NaN stays a quiet NaN
  }
}
#if defined(__F16C__)
template <>
void store_row<c10::Half>(c10::Half* y, const float* v, int64_t n) {
  const int64_t wide = n - n % 8;
  for (int64_t col = 0; col < wide; col += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + col), _mm256_cvtps_ph(_mm256_loadu_ps(v + col), _MM_FROUND_TO_NEAREST_INT));
  for (int64_t col = wide; col < n; ++col) y[col] = static_cast<c10::Half>(v[col]);
}
#endif

// The epilogue of the row-wise linear: acc [m, n] (int32, or float32 holding float(int32) as the
// prepacked oneDNN path returns it) -> Y [m, n] in x's dtype, computed in float32:
//   Y[i, :] = acc[i, :] * (sx[i] * sw) + sum over the 16-bit columns t of x[i, t] * W[:, t] + bias.
// The 16-bit columns of each group are W's stored columns (stored [j, n] float32, a row per stored
// column; pos [k] the slot of column t, -1 for none: exact), all of them, then the group's own
// (outliers of this call only): W's int8 column times the row scales, as the reference dequantizes them.
// Each element sees the same float operations (no contraction into FMA: -ffp-contract=off) whether
// a whole row is finished at once (dequantize_sequences) or a strip of columns as the AMX kernel
// computes it (amx_linear), so a sequence gets the same bits alone or in a batch, on any path.
template <typename T>
class Epilogue {
 public:
  Epilogue(int64_t m, int64_t n, const torch::Tensor& sx, const torch::Tensor& x, const torch::Tensor& masks, const torch::Tensor& w_q,
           const torch::Tensor& w_scale, const torch::Tensor& stored, const torch::Tensor& pos, const c10::optional<torch::Tensor>& bias,
           const c10::optional<torch::Tensor>& stored_bf16, const c10::optional<torch::Tensor>& smooth, torch::Tensor& out)
      : n_(n), k_(masks.size(1)), rows_(m / masks.size(0)) {
    TORCH_CHECK(x.is_contiguous() && x.size(0) == m && x.size(1) == k_ && w_scale.numel() == n && pos.numel() == k_ && sx.numel() == m,
                "dequantize_sequences: shapes do not match");
    TORCH_CHECK(w_q.dtype() == torch::kInt8 && w_q.is_contiguous() && w_q.size(0) == n && w_q.size(1) == k_, "contiguous int8 [n, k] weight expected");
    TORCH_CHECK(w_scale.dtype() == torch::kFloat32 && w_scale.is_contiguous() && pos.dtype() == torch::kInt32 && pos.is_contiguous(), "float32 scales and int32 slots expected");
    TORCH_CHECK(stored.dtype() == torch::kFloat32 && stored.is_contiguous() && stored.size(1) == n, "float32 [j, n] stored rows expected");
    TORCH_CHECK(!stored_bf16.has_value() || (stored_bf16->dtype() == torch::kBFloat16 && stored_bf16->sizes() == stored.sizes()), "bf16 stored rows of the float32 ones' shape expected");
    TORCH_CHECK(sx.dtype() == torch::kFloat32 && sx.is_contiguous() && masks.dtype() == torch::kBool && masks.is_contiguous(), "float32 row scales and bool masks expected");
    SM_ = smooth_data(smooth, k_);
    SX_ = sx.data_ptr<float>();
    SW_ = w_scale.data_ptr<float>();
    X_ = x.data_ptr<T>();
    Y_ = out.data_ptr<T>();
    if (bias.has_value()) bias_ = bias->to(torch::kFloat32).contiguous();
    B_ = bias.has_value() ? bias_.data_ptr<float>() : nullptr;
    const bool* M = masks.data_ptr<bool>();
    const int32_t* POS = pos.data_ptr<int32_t>();
    const int8_t* WQ = w_q.data_ptr<int8_t>();
    ST_ = stored.data_ptr<float>();
    slots_ = stored.size(0);
    ST16_ = stored_bf16.has_value() ? stored_bf16->data_ptr<at::BFloat16>() : nullptr;
    std::vector<int64_t> stored_columns(slots_);  // the stored columns in slot order: W's stored rows as they are
    for (int64_t t = 0; t < k_; ++t)
      if (POS[t] >= 0) stored_columns[POS[t]] = t;
    // Many columns (more than kWideColumns: a calibrated checkpoint stores most of k in some layers)
    // on sequences longer than a few rows: a GEMM per group through torch, in bf16 when the caller passes the
    // stored rows in bf16 (x is bf16 already; the weight rows round to bf16, within the bf16
    // output's tolerance, 2-3x faster than float32 on AVX512-BF16/AMX; converted once at load),
    // else float32. X's stored columns are gathered once for every group.
    const auto compute = stored_bf16.has_value() ? torch::kBFloat16 : torch::kFloat32;
    const torch::Tensor stored_w = stored_bf16.has_value() ? *stored_bf16 : stored;
    torch::Tensor x_stored;
    groups_.resize(masks.size(0));
    std::vector<int64_t> own_slot(k_, -1);  // the row of own_union_ of each column some group takes as its own
    for (int64_t g = 0; g < masks.size(0); ++g) {
      Group& G = groups_[g];
      G.columns = stored_columns;
      for (int64_t t = 0; t < k_; ++t) {
        TORCH_CHECK(M[g * k_ + t] || POS[t] < 0, "dequantize_sequences: a group's 16-bit columns must include the stored ones");
        if (M[g * k_ + t] && POS[t] < 0) G.columns.push_back(t), own_slot[t] = 0;
      }
    }
    own_union(WQ, own_slot);
    for (int64_t g = 0; g < masks.size(0); ++g) {
      Group& G = groups_[g];
      const int64_t own = static_cast<int64_t>(G.columns.size()) - slots_;
      G.own_slots.resize(own);
      for (int64_t c = 0; c < own; ++c) G.own_slots[c] = own_slot[G.columns[slots_ + c]];
      if (static_cast<int64_t>(G.columns.size()) <= kWideColumns || rows_ <= kLoopRows) continue;  // rows_, not m: a sequence takes the same branch alone or in a batch
      const int64_t r0 = g * rows_, r1 = r0 + rows_;
      if (slots_ > 0) {
        if (!x_stored.defined()) x_stored = gather_columns(0, m, stored_columns, compute);
        G.wide = at::mm(x_stored.narrow(0, r0, rows_), stored_w).to(torch::kFloat32);  // per group: its bits do not depend on the batch
      }
      if (own > 0) {
        const std::vector<int64_t> own_columns(G.columns.begin() + slots_, G.columns.end());
        const auto slots = torch::from_blob(G.own_slots.data(), {own}, torch::dtype(torch::kInt64));
        const auto own_w = own_union_.index_select(0, slots).to(compute);
        const auto part = at::mm(gather_columns(r0, r1, own_columns, compute), own_w).to(torch::kFloat32);
        G.wide = G.wide.defined() ? G.wide.add_(part) : part;
      }
      G.WIDE = G.wide.template data_ptr<float>();
    }
    same_until_.resize(groups_.size());
    for (int64_t g = static_cast<int64_t>(groups_.size()) - 1; g >= 0; --g) {
      const bool joins_next = g + 1 < static_cast<int64_t>(groups_.size()) && groups_[g].WIDE == nullptr &&
                              groups_[g + 1].WIDE == nullptr && groups_[g].columns == groups_[g + 1].columns;
      same_until_[g] = joins_next ? same_until_[g + 1] : g + 1;
    }
  }

  // The epilogue's float work: per row, a scale and a multiply-add per 16-bit column it sums itself.
  int64_t multiply_adds() const {
    int64_t total = 0;
    for (const Group& G : groups_) total += rows_ * n_ * (1 + (G.WIDE == nullptr ? static_cast<int64_t>(G.columns.size()) : 0));
    return total;
  }

  // Y[i0:i1, c0:c1] from acc, which points at acc[i0, c0], rows `ld` apart. Rows go in runs of
  // up to kRun of groups with the same 16-bit columns (a batch of decoded sequences), so that each row of W's 16-bit columns is read once per run, not
  // once per row (it is megabytes where a calibrated layer stores most of k); each element still
  // sums its terms in the same order.
  template <typename A>
  void finish(const A* acc, int64_t ld, int64_t i0, int64_t i1, int64_t c0, int64_t c1) const {
    for (int64_t r0 = i0; r0 < i1;) {
      const int64_t g = r0 / rows_, r1 = std::min({i1, r0 + kRun, same_until_[g] * rows_});
      const Group& G = groups_[g];
      if (G.WIDE != nullptr || static_cast<int64_t>(G.columns.size()) <= kLoopColumns) finish_in_registers<WideLanes>(G, acc, ld, i0, r0, r1, c0, c1);
      else finish_run<WideLanes>(G, acc, ld, i0, r0, r1, c0, c1);
      r0 = r1;
    }
  }

 private:
  // The float32 value of x[i, t] the 16-bit product takes (x * m for llm.int8-smooth).
  float x_value(int64_t i, int64_t t) const {
    return SM_ != nullptr ? static_cast<float>(X_[i * k_ + t]) * SM_[t] : static_cast<float>(X_[i * k_ + t]);
  }

  struct Group {
    std::vector<int64_t> columns;  // the 16-bit columns: the stored ones in slot order, then the group's own in index order
    std::vector<int64_t> own_slots;  // the row of own_union_ of each own column (after the stored ones)
    torch::Tensor wide;            // float32 [rows, n]: X[:, columns] W[:, columns]^T for many columns and rows
    const float* WIDE = nullptr;   // its data, or none
  };

  // W[:, columns[c]]^T in float32: a stored row as it is, or the group's own dequantized row.
  const float* weight_row(const Group& G, int64_t c) const {
    return c < slots_ ? ST_ + c * n_ : own_union_.data_ptr<float>() + G.own_slots[c - slots_] * n_;
  }

  // own_union_ [u, n] float32: W[:, t]^T for every column t that some group takes as its own
  // (own_slot[t] >= 0 on entry), as the reference dequantizes them (the int8 column times the row
  // scales), in ascending t; own_slot[t] becomes its row. One pass over W's rows for all groups:
  // column by column, each of n rows would be a cache line of its own (the 49152 rows of an int8
  // LM head: megabytes a column, again for each decoded sequence).
  void own_union(const int8_t* WQ, std::vector<int64_t>& own_slot) {
    std::vector<int64_t> columns;
    for (int64_t t = 0; t < k_; ++t)
      if (own_slot[t] >= 0) own_slot[t] = static_cast<int64_t>(columns.size()), columns.push_back(t);
    const int64_t u = static_cast<int64_t>(columns.size()), n = n_, k = k_;
    if (u == 0) return;  // (most calls: no allocation)
    own_union_ = torch::empty({u, n}, torch::dtype(torch::kFloat32));
    float* out = own_union_.data_ptr<float>();
    at::parallel_for(0, n, std::max<int64_t>(1, kParallelWork / u), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < u; ++c) out[c * n + r] = static_cast<float>(WQ[r * k + columns[c]]) * SW_[r];
    });
  }

  // X[r0:r1, cols] as the 16-bit product takes it (x_value), a [r1 - r0, cols] tensor of `dtype`.
  torch::Tensor gather_columns(int64_t r0, int64_t r1, const std::vector<int64_t>& cols, at::ScalarType dtype) const {
    const int64_t j = static_cast<int64_t>(cols.size());
    auto picked = torch::empty({r1 - r0, j}, torch::dtype(dtype));
    AT_DISPATCH_SWITCH(dtype, "gather_columns", AT_DISPATCH_CASE(at::kFloat, [&] { gather_into<scalar_t>(picked, r0, r1, cols); })
                                                    AT_DISPATCH_CASE(at::kBFloat16, [&] { gather_into<scalar_t>(picked, r0, r1, cols); }));
    return picked;
  }

  template <typename O>
  void gather_into(torch::Tensor& picked, int64_t r0, int64_t r1, const std::vector<int64_t>& cols) const {
    O* out = picked.data_ptr<O>();
    const int64_t j = static_cast<int64_t>(cols.size());
    at::parallel_for(r0, r1, kParallelRows, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i)
        for (int64_t c = 0; c < j; ++c) out[(i - r0) * j + c] = static_cast<O>(x_value(i, cols[c]));
    });
  }

  // Up to kLoopColumns 16-bit columns (the paper's handful), or their product already in WIDE:
  // each element's terms in registers (the scale, WIDE or each column in order, the bias), one
  // pass instead of one per term, row by row; a chunk of output columns serves every row of the
  // run, so W's rows are read once per chunk.
  template <typename L, typename A>
  void finish_in_registers(const Group& G, const A* acc, int64_t ld, int64_t i0, int64_t r0, int64_t r1, int64_t c0, int64_t c1) const {
    const int64_t j = G.WIDE != nullptr ? 0 : static_cast<int64_t>(G.columns.size());
    float xs[kRun][kLoopColumns];
    const float* w[kLoopColumns];
    for (int64_t c = 0; c < j; ++c) w[c] = weight_row(G, c);
    for (int64_t i = r0; i < r1; ++i)
      for (int64_t c = 0; c < j; ++c) xs[i - r0][c] = x_value(i, G.columns[c]);
    alignas(64) float line[kChunk];
    for (int64_t b0 = c0; b0 < c1; b0 += kChunk) {
      const int64_t b1 = std::min(c1, b0 + kChunk);
      for (int64_t i = r0; i < r1; ++i) {
        const A* a = acc + (i - i0) * ld - c0;  // a[col] for col in [c0, c1)
        const float* wide = G.WIDE != nullptr ? G.WIDE + (i - (r0 / rows_) * rows_) * n_ : nullptr;  // WIDE: the run has one group
        int64_t col = b0;
        for (; col + L::kWidth <= b1; col += L::kWidth) L::store(line + (col - b0), element<L>(a, col, SX_[i], wide, xs[i - r0], w, j));
        for (; col < b1; ++col) ScalarLanes::store(line + (col - b0), element<ScalarLanes>(a, col, SX_[i], wide, xs[i - r0], w, j));
        store_row(Y_ + i * n_ + b0, line, b1 - b0);
      }
    }
  }

  template <typename L, typename A>
  typename L::F element(const A* a, int64_t col, float s, const float* wide, const float* xs, const float* const* w, int64_t j) const {
    typename L::F v = L::times(L::load(a + col), L::mul(L::splat(s), SW_ + col));
    if (wide != nullptr) v = L::plus(v, wide + col);
    for (int64_t c = 0; c < j; ++c) v = L::add_product(v, xs[c], L::load(w[c] + col));
    if (B_ != nullptr) v = L::plus(v, B_ + col);
    return v;
  }

  static constexpr int64_t kChunk = 256;  // output columns whose partial sums wait in `line`
  static constexpr int64_t kColumnBlock = 64;  // 16-bit columns whose W rows stay in L1 for a chunk

  template <typename A>
  struct Run {
    const A* acc;  // row r0 + r, column col: acc + r * ld + col
    int64_t ld, r0;
    const float* xs;  // xs[r * j + c]
    int64_t j;
    const float* const* w32;
    const c10::BFloat16* const* w16;
  };

  // More than kLoopColumns 16-bit columns on a short sequence (or a decoded batch's run of
  // sequences sharing them), columns [c0, c1): the terms of an element in the same order as finish_in_registers (the scale,
  // each column in order, the bias). A vector of output columns holds up to 8 rows in registers,
  // so each W row is read once per 8 rows; columns go in blocks whose W rows stay in L1 while a
  // chunk of output columns passes, the partial sums waiting in `line` between blocks (a float
  // stored and loaded back is the same float).
  template <typename L, typename A>
  void finish_run(const Group& G, const A* acc, int64_t ld, int64_t i0, int64_t r0, int64_t r1, int64_t c0, int64_t c1) const {
    const int64_t rows = r1 - r0, j = static_cast<int64_t>(G.columns.size());
    thread_local std::vector<float> xs;  // xs[r * j + c]: the row's value in column c
    thread_local std::vector<const float*> w32;  // W's row of column c in float32, or null ...
    thread_local std::vector<const c10::BFloat16*> w16;  // ... in bf16 (a stored column where the caller gives them: half the bytes)
    xs.resize(rows * j);
    w32.assign(j, nullptr);
    w16.assign(j, nullptr);
    for (int64_t c = 0; c < j; ++c) {
      if (ST16_ != nullptr && c < slots_) w16[c] = ST16_ + c * n_;
      else w32[c] = weight_row(G, c);
      for (int64_t r = 0; r < rows; ++r) xs[r * j + c] = x_value(r0 + r, G.columns[c]);
    }
    // in pieces of 8, 4, 2 and 1 rows, whose sums the compiler keeps in registers
    for (int64_t r = 0; r < rows;) {
      const Run<A> run{acc + (r0 + r - i0) * ld - c0, ld, r0 + r, xs.data() + r * j, j, w32.data(), w16.data()};
      const int64_t left = rows - r;
      if (left >= 8) finish_rows<8, L>(run, c0, c1), r += 8;
      else if (left >= 4) finish_rows<4, L>(run, c0, c1), r += 4;
      else if (left >= 2) finish_rows<2, L>(run, c0, c1), r += 2;
      else finish_rows<1, L>(run, c0, c1), r += 1;
    }
  }

  template <int64_t R, typename L, typename A>
  void finish_rows(const Run<A>& run, int64_t c0, int64_t c1) const {
    if constexpr (R == 1) return finish_row_by_columns(run, c0, c1);
    alignas(64) float line[R][kChunk];
    for (int64_t b0 = c0; b0 < c1; b0 += kChunk) {
      const int64_t b1 = std::min(c1, b0 + kChunk);
      for (int64_t cb = 0; cb < run.j; cb += kColumnBlock) {
        const int64_t ce = std::min(run.j, cb + kColumnBlock);
        int64_t col = b0;
        for (; col + L::kWidth <= b1; col += L::kWidth) step<R, L>(run, col, cb, ce, line, col - b0);
        for (; col < b1; ++col) step<R, ScalarLanes>(run, col, cb, ce, line, col - b0);
      }
      for (int64_t r = 0; r < R; ++r) store_row(Y_ + (run.r0 + r) * n_ + b0, line[r], b1 - b0);
    }
  }

  // One row and many 16-bit columns (decoding one sequence): columns outer, so that each W row
  // streams through contiguously (a vector of all rows gains nothing with one row). The same float
  // operations as `step`, in the same order; plain loops that the compiler vectorizes.
  template <typename A>
  void finish_row_by_columns(const Run<A>& run, int64_t c0, int64_t c1) const {
    const int64_t width = c1 - c0;
    thread_local std::vector<float> line;
    line.resize(width);
    float* v = line.data();
    const A* a = run.acc + c0;
    const float s = SX_[run.r0];
    for (int64_t u = 0; u < width; ++u) v[u] = static_cast<float>(a[u]) * (s * SW_[c0 + u]);
    for (int64_t c = 0; c < run.j; ++c) {
      const float x = run.xs[c];
      if (run.w16[c] != nullptr) {
        const c10::BFloat16* w = run.w16[c] + c0;
        for (int64_t u = 0; u < width; ++u) v[u] += x * static_cast<float>(w[u]);
      } else {
        const float* w = run.w32[c] + c0;
        for (int64_t u = 0; u < width; ++u) v[u] += x * w[u];
      }
    }
    if (B_ != nullptr)
      for (int64_t u = 0; u < width; ++u) v[u] += B_[c0 + u];
    store_row(Y_ + run.r0 * n_ + c0, v, width);
  }

  // One vector of output columns at `col` for R rows, 16-bit columns [cb, ce).
  template <int64_t R, typename L, typename A>
  void step(const Run<A>& run, int64_t col, int64_t cb, int64_t ce, float (*line)[kChunk], int64_t at) const {
    typename L::F v[R];
    for (int64_t r = 0; r < R; ++r) {
      if (cb > 0) {
        v[r] = L::load(line[r] + at);
        continue;
      }
      v[r] = L::times(L::load(run.acc + r * run.ld + col), L::mul(L::splat(SX_[run.r0 + r]), SW_ + col));
    }
    for (int64_t c = cb; c < ce; ++c) {
      const typename L::F w = run.w16[c] != nullptr ? L::load(run.w16[c] + col) : L::load(run.w32[c] + col);
      for (int64_t r = 0; r < R; ++r) v[r] = L::add_product(v[r], run.xs[r * run.j + c], w);
    }
    for (int64_t r = 0; r < R; ++r) {
      if (ce == run.j && B_ != nullptr) v[r] = L::plus(v[r], B_ + col);
      L::store(line[r] + at, v[r]);
    }
  }

  int64_t n_, k_, rows_, slots_ = 0;
  const float *SM_ = nullptr, *SX_ = nullptr, *SW_ = nullptr, *B_ = nullptr, *ST_ = nullptr;
  const c10::BFloat16* ST16_ = nullptr;  // the stored rows in bf16, or none
  const T* X_ = nullptr;
  T* Y_ = nullptr;
  torch::Tensor bias_;
  std::vector<Group> groups_;
  torch::Tensor own_union_;  // own_union(): W's dequantized rows of the columns the groups take as their own
  std::vector<int64_t> same_until_;  // per group: the end of the run of following groups with its columns (itself alone if it has WIDE)
};

// Y[:, first:first + n] from the product of those columns, acc [m, n] (int32, or float32 =
// float(int32)), through the epilogue.
template <typename T>
void finish_product(const Epilogue<T>& epilogue, const torch::Tensor& acc, int64_t m, int64_t n, int64_t first = 0) {
  // Tiles of up to kRun rows (a run shares each read of W's 16-bit columns). Where there are few
  // such tiles (decoding) and the 16-bit part is heavy (a calibrated layer that stores many
  // columns), the columns are split too, or one thread would do it alone; the row tile is the
  // fast index, so each thread's share holds every row tile. An element's operations do not
  // depend on its tile.
  const int64_t row_tiles = (m + kRun - 1) / kRun, threads = at::get_num_threads();
  const bool split = row_tiles < threads && epilogue.multiply_adds() >= kParallelWork;
  // as few column tiles as keep every thread busy: each streams longer pieces of W's rows
  const int64_t wanted = split ? std::max<int64_t>(1, std::min((threads + row_tiles - 1) / row_tiles, n / kEpilogueColumns)) : 1;
  const int64_t width = ((n + wanted - 1) / wanted + 15) / 16 * 16;  // whole vectors of 16 lanes: no scalar tails inside a row
  const int64_t column_tiles = (n + width - 1) / width;
  at::parallel_for(0, row_tiles * column_tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t % row_tiles * kRun, r1 = std::min(m, r0 + kRun);
      const int64_t c0 = t / row_tiles * width, c1 = std::min(n, c0 + width);
      if (acc.dtype() == torch::kInt32) epilogue.finish(acc.data_ptr<int32_t>() + r0 * n + c0, n, r0, r1, first + c0, first + c1);
      else epilogue.finish(acc.data_ptr<float>() + r0 * n + c0, n, r0, r1, first + c0, first + c1);
    }
  });
}

// The output columns of one oneDNN product in rowwise_linear: all n, or where the int32 sums of
// the m rows would not fit in L3 (kWholeProductBytes), chunks that stay in L2 until the epilogue
// reads them (an int8 LM head: SmolLM2's at 512 rows is 100 MB of sums; chunked, its layer runs
// 1.9x as fast there and 1.45x at 2048 rows, Llama-1B's 8192-row projections 1.3x at 2048 rows).
int64_t product_chunk(int64_t m, int64_t n) {
  if (4 * m * n <= kWholeProductBytes) return n;
  return std::min(n, std::max<int64_t>(kMinProductChunk, kProductChunkBytes / (4 * m) / kEpilogueColumns * kEpilogueColumns));
}

torch::Tensor dequantize_sequences(torch::Tensor acc, torch::Tensor sx, torch::Tensor x, torch::Tensor masks, torch::Tensor w_q,
                                   torch::Tensor w_scale, torch::Tensor stored, torch::Tensor pos, c10::optional<torch::Tensor> bias,
                                   c10::optional<torch::Tensor> stored_bf16, c10::optional<torch::Tensor> smooth) {
  TORCH_CHECK(acc.dim() == 2 && acc.is_contiguous() && (acc.dtype() == torch::kInt32 || acc.dtype() == torch::kFloat32), "contiguous int32 or float32 acc expected");
  const int64_t m = acc.size(0), n = acc.size(1);
  auto out = torch::empty({m, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dequantize_sequences", [&] {
    finish_product(Epilogue<scalar_t>(m, n, sx, x, masks, w_q, w_scale, stored, pos, bias, stored_bf16, smooth, out), acc, m, n);
  });
  return out;
}

// amx_gemm then dequantize_sequences in one pass: each strip of the int32 product (up to 256 rows
// x 128 columns) is finished while it is in L2, so the int32 product never goes through memory.
torch::Tensor amx_linear(torch::Tensor q, torch::Tensor packed, int64_t n, torch::Tensor sx, torch::Tensor x, torch::Tensor masks,
                         torch::Tensor w_q, torch::Tensor w_scale, torch::Tensor stored, torch::Tensor pos, c10::optional<torch::Tensor> bias,
                         c10::optional<torch::Tensor> stored_bf16, c10::optional<torch::Tensor> smooth) {
  const int64_t m = q.size(0);
  auto out = torch::empty({m, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "amx_linear", [&] {
    const Epilogue<scalar_t> epilogue(m, n, sx, x, masks, w_q, w_scale, stored, pos, bias, stored_bf16, smooth, out);
    amx_gemm_blocks(q, packed, n, [&](int64_t row, int64_t rows, int64_t col, int64_t cols, const int32_t* block, int64_t ld) {
      epilogue.finish(block, ld, row, row + rows, col, col + cols);
    });
  });
  return out;
}


// The row-wise linear in one native call: quantize_sequences, the int8 product and the epilogue, so
// no Python runs between the three. The product is this file's kernel (decoding), per strip of
// kStrip rows of W with the epilogue run while the strip's sums are in L1 (the int32 product never
// goes through memory), or with `onednn` oneDNN's at::_int_mm over the whole batch (prefill) on
// W.t() or, given, w_kn (a copy of W laid out [k, n]), in chunks of W's rows where the sums would
// not fit in L3 (product_chunk), then the epilogue as dequantize_sequences runs it. A flag, not a transposed view: a compiled graph would copy a view of its constant W into
// a buffer of its own at every call.
// The arguments are quantize_sequences' and dequantize_sequences' (the weight as stored, [n, k]);
// x is [m, k] of `groups` sequences, each finding its own outlier columns; the bits are theirs.
constexpr int64_t kStrip = 8 * kBlockN;  // rows of W per strip: the epilogue's call costs less than 1 % of the strip's product

torch::Tensor rowwise_linear(torch::Tensor x, torch::Tensor w_q, torch::Tensor w_scale, torch::Tensor stored_mask, torch::Tensor stored,
                             torch::Tensor pos, c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> stored_bf16,
                             c10::optional<torch::Tensor> smooth, double threshold, int64_t groups, c10::optional<torch::Tensor> w_kn, bool onednn) {
  TORCH_CHECK(w_q.dtype() == torch::kInt8 && w_q.dim() == 2 && w_q.is_contiguous() && w_q.size(1) == x.size(-1), "contiguous int8 [n, k] weight expected");
  TORCH_CHECK(!w_kn.has_value() || (onednn && w_kn->dtype() == torch::kInt8 && w_kn->dim() == 2 && w_kn->size(0) == w_q.size(1) && w_kn->size(1) == w_q.size(0)),
              "w_kn: an int8 [k, n] weight for the oneDNN product expected");
  const auto quantized = quantize_sequences(x, stored_mask, threshold, groups, smooth);
  const torch::Tensor &q = quantized[0], &sx = quantized[1], &masks = quantized[2];
  const int64_t m = x.size(0), k = x.size(1), n = w_q.size(0);
  auto out = torch::empty({m, n}, x.options());
  // strips of whole kBlockN blocks, at least one per thread where the work is worth splitting
  const int64_t threads = m * k * n >= kParallelWork ? at::get_num_threads() : 1;
  const int64_t strip = std::max<int64_t>(kBlockN, std::min(kStrip, ((n + threads - 1) / threads + kBlockN - 1) / kBlockN * kBlockN));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rowwise_linear", [&] {
    const Epilogue<scalar_t> epilogue(m, n, sx, x, masks, w_q, w_scale, stored, pos, bias, stored_bf16, smooth, out);
    if (onednn) {  // in chunks of W's rows whose int32 sums the epilogue reads while they are in cache
      const int64_t chunk = product_chunk(m, n);
      for (int64_t j0 = 0; j0 < n; j0 += chunk) {
        const int64_t width = std::min(chunk, n - j0);
        finish_product(epilogue, at::_int_mm(q, w_kn.has_value() ? w_kn->narrow(1, j0, width) : w_q.narrow(0, j0, width).t()), m, width, j0);
      }
      return;
    }
    const int8_t* A = q.data_ptr<int8_t>();
    const int8_t* W = w_q.data_ptr<int8_t>();
    at::parallel_for(0, (n + strip - 1) / strip, 1, [&](int64_t s0, int64_t s1) {
      thread_local std::vector<int32_t> sums;
      sums.resize(m * strip);
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t j0 = s * strip, width = std::min(n, j0 + strip) - j0;
        for (int64_t b = 0; b < width; b += kBlockN) gemm_block(A, W + j0 * k, sums.data(), m, k, width, b, std::min(width, b + kBlockN));
        epilogue.finish(sums.data(), width, 0, m, j0, j0 + width);
      }
    });
  });
  return out;
}

// How many of torch's threads a parallel_for of `tasks` chunks runs on. The build must say so:
// ATen's OpenMP parallel_for is a header template, and compiled without OpenMP it runs on the
// calling thread alone, silently.
int64_t threads_used(int64_t tasks) {
  std::vector<int64_t> seen(tasks, -1);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) seen[t] = at::get_thread_num();
  });
  std::sort(seen.begin(), seen.end());
  return std::unique(seen.begin(), seen.end()) - seen.begin();
}

bool has_avx2() {
#if defined(__AVX2__)
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("int8_gemm", &int8_gemm, "exact int8 x int8 -> int32 GEMM, C = A W^T", py::arg("a"), py::arg("w"), py::arg("vnni") = true);
  module.def("has_vnni", &vnni_here, "whether the CPU runs the AVX512-VNNI tile");
  module.def("quantize_sequences", &quantize_sequences, "row-wise absmax quantization with per-sequence outlier columns");
  module.def("dequantize_sequences", &dequantize_sequences, "scales, per-sequence 16-bit outlier columns and bias on the int8 product");
  module.def("quantize_rows", &quantize_rows, "row-wise absmax int8 quantization fused with outlier detection",
             py::arg("x"), py::arg("exclude"), py::arg("threshold"), py::arg("lanes") = WideLanes::kWidth);
  module.def("quantize_rotated_sequences", &quantize_rotated_sequences, "llm.int8-rotate's activation side: per-sequence outlier columns, X'R quantized row-wise");
  module.def("lane_widths", &lane_widths, "the activation kernel's lane widths in this build, widest first");
  module.def("threads_used", &threads_used, "how many threads a parallel_for over `tasks` chunks runs on");
  module.def("has_avx2", &has_avx2, "whether the kernel was built with AVX2");
  module.def("has_amx", &has_amx, "whether this build, CPU and kernel run AMX-INT8 tiles");
  module.def("amx_pack", &amx_pack, "an int8 weight [n, k] reordered into AMX tiles, once");
  module.def("amx_gemm", &amx_gemm, "exact int8 x int8 -> int32 GEMM on AMX tiles, C = A W^T");
  module.def("amx_linear", &amx_linear, "amx_gemm and dequantize_sequences in one pass");
  module.def("has_bf16_attention", &has_bf16_attention, "whether the CPU runs prompt_attention (AVX512-BF16)");
  module.def("decode_attention", &decode_attention, "one query's attention over a cache, masked or not, bf16, [b, h, 1, d] -> [b, 1, h, d]");
  module.def("prompt_attention", &prompt_attention, "a whole prompt's attention, causal or masked, bf16, [b, h, l, d] -> [b, l, h, d]");
  module.def("rowwise_linear", &rowwise_linear, "quantize_sequences, the int8 product (this file's, or oneDNN's) and dequantize_sequences in one call",
             py::arg("x"), py::arg("w_q"), py::arg("w_scale"), py::arg("stored_mask"), py::arg("stored"), py::arg("pos"), py::arg("bias"),
             py::arg("stored_bf16"), py::arg("smooth"), py::arg("threshold"), py::arg("groups"), py::arg("w_kn") = py::none(), py::arg("onednn") = false);
}

// The same function as a torch op, so that a compiled graph calls it without Python in between
// (its fake implementation is registered in cpu_kernels.py).
TORCH_LIBRARY(llmint8_cpu, library) {
  library.def("rowwise_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor stored_mask, Tensor stored, Tensor pos, Tensor? bias, "
              "Tensor? stored_bf16, Tensor? smooth, float threshold, int groups, Tensor? w_kn=None, bool onednn=False) -> Tensor");
  library.def("prompt_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
  library.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmint8_cpu, CPU, library) {
  library.impl("rowwise_linear", &rowwise_linear);
  library.impl("prompt_attention", &prompt_attention);
  library.impl("decode_attention", &decode_attention);
}
