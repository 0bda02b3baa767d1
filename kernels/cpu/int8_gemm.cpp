// Exact int8 x int8 -> int32 GEMM for CPUs with AVX2 (and a portable scalar path).
//
//   C[i, j] = sum_k A[i, k] * W[j, k]      A: [m, k] int8, W: [n, k] int8 (rows of the weight)
//
// AVX2 has no signed x signed byte product, only vpmaddubsw (u8 x s8 -> pairs summed in s16,
// saturating). With q in [-127, 127] we feed |a| (u8 <= 127) and sign(w, a) (s8): each pair sum
// is at most 2 * 127 * 127 = 32258 < 32767, so it never saturates and the result is exact.
// vpmaddwd with ones then widens the pairs to int32. The kernel keeps 2 rows of A x 4 rows of W
// in registers; W is walked in blocks that stay in L2 while every row of A passes over them.
// Threads split the output columns through at::parallel_for (torch's own thread pool).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlockN = 32;  // rows of W per block: 32 x k bytes stay in L2

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
    for (int j = 0; j < NR; ++j) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * k + t));
      for (int r = 0; r < MR; ++r) acc[r][j] = dot32(acc[r][j], abs_av[r], av[r], wv, ones);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j)
      c[r * ldc + j] = hsum(acc[r][j]) + dot_scalar(a + r * k, w + j * k, k32, k);
}

// 8 consecutive values as float32, whatever the 16/32-bit input type.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
template <typename T>
inline __m256 load8(const T* p) {  // float64: narrowed one by one, as the scalar path does
  alignas(32) float lanes[8];
  for (int j = 0; j < 8; ++j) lanes[j] = static_cast<float>(p[j]);
  return _mm256_load_ps(lanes);
}
inline __m256 abs8(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
inline __m256 keep8(const int32_t* keep) { return _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keep))); }
#endif

void gemm_block(const int8_t* A, const int8_t* W, int32_t* C, int64_t m, int64_t k, int64_t n,
                int64_t j0, int64_t j1) {
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
torch::Tensor int8_gemm(torch::Tensor a, torch::Tensor w) {
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
      gemm_block(A, W, C, m, k, n, b * kBlockN, std::min(n, (b + 1) * kBlockN));
  });
  return c;
}

// Row-wise absmax quantization fused with outlier detection (LLM.int8()'s activation side).
//   x: [m, k] float32, exclude: [k] bool (columns already taken out, e.g. stored outliers),
//   threshold: |x| >= threshold (or NaN/Inf) marks a column as an outlier in this call.
// Returns (q int8 [m, k], scale float32 [m], outlier bool [k]). Outlier and excluded columns are
// 0 in q and do not enter the row absmax. Rounding and the scale formula are the reference's:
//   inv = 127 / absmax (0 when absmax == 0), q = round_half_even(x * inv), scale = absmax / 127.
// Core of quantize_rows, writing into caller buffers; mask holds the excluded columns on entry
// and every 16-bit column of this call on exit. Both passes split the rows over threads and run
// 8 columns at a time with AVX2 (fp16 through F16C, bf16 by shifting); tails go scalar.
template <typename T>
void quantize_rows_into(const T* X, int64_t m, int64_t k, float limit, bool* M, int8_t* Q, float* S) {
#if defined(__AVX2__)
  const int64_t k8 = k & ~int64_t(7);
#else
  const int64_t k8 = 0;
#endif
  // pass 1: columns holding some |x| >= threshold, NaN or Inf (!(|x| < limit) catches all three);
  // each block of rows ORs into its own int32 row of flags, merged afterwards
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(m, at::get_num_threads()));
  std::vector<int32_t> hits(blocks * k, 0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int32_t* hit = hits.data() + b * k;
      for (int64_t i = b * m / blocks; i < (b + 1) * m / blocks; ++i) {
        const T* row = X + i * k;
#if defined(__AVX2__)
        const __m256 lim = _mm256_set1_ps(limit);
        for (int64_t t = 0; t < k8; t += 8) {
          const __m256 flag = _mm256_cmp_ps(abs8(load8(row + t)), lim, _CMP_NLT_UQ);
          float* h = reinterpret_cast<float*>(hit + t);
          _mm256_storeu_ps(h, _mm256_or_ps(_mm256_loadu_ps(h), flag));
        }
#endif
        for (int64_t t = k8; t < k; ++t) hit[t] |= !(std::fabs(static_cast<float>(row[t])) < limit) ? -1 : 0;
      }
    }
  });
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t t = 0; t < k; ++t) M[t] = M[t] || hits[b * k + t] != 0;
  // pass 2: per row, absmax over the kept columns, then quantize (the row stays in cache)
  std::vector<int32_t> keep(k);  // all bits set for kept columns: an AND zeroes the others, NaN included
  for (int64_t t = 0; t < k; ++t) keep[t] = M[t] ? 0 : -1;
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const T* row = X + i * k;
      float absmax = 0.0f;
#if defined(__AVX2__)
      __m256 vmax = _mm256_setzero_ps();
      for (int64_t t = 0; t < k8; t += 8)
        vmax = _mm256_max_ps(vmax, _mm256_and_ps(abs8(load8(row + t)), keep8(keep.data() + t)));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, vmax);
      for (float lane : lanes) absmax = std::max(absmax, lane);
#endif
      for (int64_t t = k8; t < k; ++t)
        if (keep[t]) absmax = std::max(absmax, std::fabs(static_cast<float>(row[t])));
      const float inv = absmax > 0.0f ? 127.0f / absmax : 0.0f;
      int8_t* out = Q + i * k;
#if defined(__AVX2__)
      const __m256 vinv = _mm256_set1_ps(inv), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
      for (int64_t t = 0; t < k8; t += 8) {
        __m256 v = _mm256_round_ps(_mm256_mul_ps(load8(row + t), vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_and_ps(_mm256_min_ps(hi, _mm256_max_ps(lo, v)), keep8(keep.data() + t));
        const __m256i q32 = _mm256_cvtps_epi32(v);
        const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q32), _mm256_extracti128_si256(q32, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(out + t), _mm_packs_epi16(q16, q16));
      }
#endif
      for (int64_t t = k8; t < k; ++t) {
        const float v = keep[t] ? std::nearbyint(static_cast<float>(row[t]) * inv) : 0.0f;
        out[t] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
      }
      S[i] = absmax / 127.0f;
    }
  });
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
std::vector<torch::Tensor> quantize_rows(torch::Tensor x, torch::Tensor exclude, double threshold) {
  check_rows(x, exclude);
  const int64_t m = x.size(0), k = x.size(1);
  auto mask = exclude.contiguous().clone();
  auto q = torch::empty({m, k}, x.options().dtype(torch::kInt8));
  auto scale = torch::empty({m}, x.options().dtype(torch::kFloat32));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_rows", [&] {
    quantize_rows_into<scalar_t>(x.data_ptr<scalar_t>(), m, k, static_cast<float>(threshold), mask.data_ptr<bool>(), q.data_ptr<int8_t>(), scale.data_ptr<float>());
  });
  return {q, scale, mask};
}

// The row-wise linear (llm.int8, vectorwise, rowwise, rowwise+decomp) in two calls around the
// int8 GEMM, which the caller runs through the fastest path of the machine (cpu_kernels.py):
//   Y = (acc * (sx ⊗ sw)) + X[:, O] W[:, O]^T + bias, in float32, for x [m, k].
// The m rows are `groups` sequences of m / groups rows; each finds its own outlier columns O_g
// (the reference calls the linear once per sequence). One int8 GEMM serves all of them.
//
// quantize_sequences: x [m, k] and stored_mask [k] (the stored outlier columns) ->
//   (q int8 [m, k], sx float32 [m], masks bool [groups, k]: the 16-bit columns of each group).
std::vector<torch::Tensor> quantize_sequences(torch::Tensor x, torch::Tensor stored_mask, double threshold, int64_t groups) {
  check_rows(x, stored_mask);
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(groups >= 1 && m % groups == 0, "rows must split into equal groups");
  const int64_t rows = m / groups;
  auto q = torch::empty({m, k}, x.options().dtype(torch::kInt8));
  auto sx = torch::empty({m}, x.options().dtype(torch::kFloat32));
  auto masks = stored_mask.contiguous().reshape({1, k}).repeat({groups, 1});
  bool* M = masks.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_sequences", [&] {
    for (int64_t g = 0; g < groups; ++g)
      quantize_rows_into<scalar_t>(x.data_ptr<scalar_t>() + g * rows * k, rows, k, static_cast<float>(threshold), M + g * k,
                                   q.data_ptr<int8_t>() + g * rows * k, sx.data_ptr<float>() + g * rows);
  });
  return {q, sx, masks};
}

// dequantize_sequences: acc [m, n] (int32, or float32 holding float(int32) as the prepacked
// oneDNN path returns it) -> Y float32 [m, n]. cols [n, j] holds W's 16-bit columns in float32
// (stored ones exact, run-time ones dequantized by the caller) and pos [k] the position of
// column t in cols, -1 for a column no group takes out. Each group's 16-bit part is added over
// its own columns: the same float operations as a call with that sequence alone, so results do
// not depend on what a sequence is batched with.
torch::Tensor dequantize_sequences(torch::Tensor acc, torch::Tensor sx, torch::Tensor x, torch::Tensor masks, torch::Tensor pos,
                                   torch::Tensor cols, torch::Tensor w_scale, c10::optional<torch::Tensor> bias) {
  const int64_t m = acc.size(0), n = acc.size(1), groups = masks.size(0), k = masks.size(1), rows = m / groups;
  TORCH_CHECK(acc.is_contiguous() && (acc.dtype() == torch::kInt32 || acc.dtype() == torch::kFloat32), "contiguous int32 or float32 acc expected");
  TORCH_CHECK(x.size(0) == m && x.size(1) == k && w_scale.numel() == n && pos.numel() == k && cols.size(0) == n, "dequantize_sequences: shapes do not match");
  auto out = torch::empty({m, n}, x.options().dtype(torch::kFloat32));
  const float* SX = sx.data_ptr<float>();
  const float* SW = w_scale.data_ptr<float>();
  float* Y = out.data_ptr<float>();
  auto scale_rows = [&](auto* A) {
    at::parallel_for(0, m, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t j = 0; j < n; ++j) Y[i * n + j] = static_cast<float>(A[i * n + j]) * (SX[i] * SW[j]);
    });
  };
  if (acc.dtype() == torch::kInt32) scale_rows(acc.data_ptr<int32_t>());
  else scale_rows(acc.data_ptr<float>());
  const bool* M = masks.data_ptr<bool>();
  const int32_t* POS = pos.data_ptr<int32_t>();
  const auto long_options = x.options().dtype(torch::kLong);
  for (int64_t g = 0; g < groups; ++g) {
    std::vector<int64_t> columns, slots;
    for (int64_t t = 0; t < k; ++t)
      if (M[g * k + t]) {
        TORCH_CHECK(POS[t] >= 0, "dequantize_sequences: a 16-bit column has no weight column");
        columns.push_back(t);
        slots.push_back(POS[t]);
      }
    if (columns.empty()) continue;
    auto x_out = x.narrow(0, g * rows, rows).index_select(1, torch::tensor(columns, long_options)).to(torch::kFloat32);
    auto w_out = cols.index_select(1, torch::tensor(slots, long_options)).t();  // W[:, O_g]^T, float32
    out.narrow(0, g * rows, rows).addmm_(x_out, w_out);
  }
  if (bias.has_value()) out.add_(*bias);
  return out;
}

bool has_avx2() {
#if defined(__AVX2__)
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("int8_gemm", &int8_gemm, "exact int8 x int8 -> int32 GEMM, C = A W^T");
  module.def("quantize_sequences", &quantize_sequences, "row-wise absmax quantization with per-sequence outlier columns");
  module.def("dequantize_sequences", &dequantize_sequences, "scales, per-sequence 16-bit outlier columns and bias on the int8 product");
  module.def("quantize_rows", &quantize_rows, "row-wise absmax int8 quantization fused with outlier detection");
  module.def("has_avx2", &has_avx2, "whether the kernel was built with AVX2");
}
