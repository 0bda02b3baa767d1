// Attention over a whole prompt, bf16, for CPUs with AVX512-BF16 (Zen 4, Cooper Lake and later
// Xeons): a prefill's attention, causal, or under the mask transformers made (padding, a static
// cache's empty tail, packed sequences, sliding windows).
//
//   out[b, i, h, :] = sum_{j allowed} softmax_j(scale * q[b, h, i, :] . k[b, h / g, j, :]) v[b, h / g, j, :]
//
// torch's CPU flash attention runs this at 60-110 GFLOPS here without AMX (a oneDNN call per
// block, the whole 512-key block scored for every query block): 5 ms for one SmolLM2 layer at 512
// tokens. This kernel scores and sums in registers with vdpbf16ps (bf16 pairs into float32), from
// keys and values packed once per call into the pair layout that instruction reads, and keeps
// flash attention's running softmax (float32 max, sum and output; the probabilities rounded to
// bf16 for the second product, as torch's kernel does), so a query block visits only the keys at
// or before its last query (or, under a mask, the 64-key blocks some of its queries attend).
//
// A decoded token (one query) has its own path, decode_attention: packing would cost as much as
// the attention, so it reads the cache where it is. torch's flash kernel takes 40 us a SmolLM2
// layer for it at batch 1 and 424 us at batch 8 (compiled, transformers cannot fold grouped heads
// into one query block as it does eagerly); this path 6 and 23 us.

#include "attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define LLMINT8_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif

namespace {

constexpr int64_t kQueryBlock = 32;  // queries a task takes: their running rows stay in L1
constexpr int64_t kKeyBlock = 64;  // keys scored at once: four 16-key chunks
constexpr int kRows = 4;  // query rows per register tile: 4 x 4 float32 accumulators

bool bf16_here() {
#if defined(__GNUC__) && defined(__x86_64__)
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

#if defined(__GNUC__) && defined(__x86_64__)

// exp(x) for float32 lanes: x = n ln2 + r, |r| <= ln2 / 2, Cephes' expf polynomial (within 2 ulp),
// 2^n applied by vscalefps (0 below float's range, no overflow for x <= 0 as here).
LLMINT8_BF16 inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // exp(-104) is below float's least denormal: 0 either way, and r stays exact
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline __m512bh as_pairs(__m512i v) { return (__m512bh)v; }

// scores[r, 0:64] = scale * q_r . keys (a 64-key block), for kRows query rows; `keys` is the block's
// 4 chunks, each [dim / 2][16 keys][2] (one zmm a pair of dimensions).
template <int R>
LLMINT8_BF16 inline void score_tile(const uint16_t* q, int64_t q_row, const uint16_t* keys, int64_t dim, float scale, float* scores) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  const int64_t chunk = dim * 16;  // bf16 elements per 16-key chunk
  for (int64_t p = 0; p < dim / 2; ++p) {
    __m512i k[4];
    for (int c = 0; c < 4; ++c) k[c] = _mm512_loadu_si512(keys + c * chunk + p * 32);
    for (int r = 0; r < R; ++r) {
      const __m512i pair = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(q + r * q_row + 2 * p));
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], as_pairs(pair), as_pairs(k[c]));
    }
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(scores + r * kKeyBlock + c * 16, _mm512_mul_ps(acc[r][c], s));
}

// out[r, d0 : d0 + 16 C] += probs[r, 0:pairs*2] . values, for kRows rows; `values` [key pairs][dim][2].
template <int R, int C>
LLMINT8_BF16 inline void sum_tile(const uint16_t* probs, const uint16_t* values, int64_t dim, int64_t pairs, int64_t d0, float* out, int64_t out_row) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_loadu_ps(out + r * out_row + d0 + 16 * c);
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i v[C];
    for (int c = 0; c < C; ++c) v[c] = _mm512_loadu_si512(values + p * 2 * dim + 2 * (d0 + 16 * c));
    for (int r = 0; r < R; ++r) {
      const __m512i pair = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(probs + r * kKeyBlock + 2 * p));
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], as_pairs(pair), as_pairs(v[c]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + r * out_row + d0 + 16 * c, acc[r][c]);
}

template <int R>
LLMINT8_BF16 void sum_rows(const uint16_t* probs, const uint16_t* values, int64_t dim, int64_t pairs, float* out) {
  for (int64_t d0 = 0; d0 < dim; d0 += 64) {
    switch (std::min<int64_t>(4, (dim - d0) / 16)) {
      case 4: sum_tile<R, 4>(probs, values, dim, pairs, d0, out, dim); break;
      case 3: sum_tile<R, 3>(probs, values, dim, pairs, d0, out, dim); break;
      case 2: sum_tile<R, 2>(probs, values, dim, pairs, d0, out, dim); break;
      default: sum_tile<R, 1>(probs, values, dim, pairs, d0, out, dim); break;
    }
  }
}

// One row's running softmax over a scored block: the keys whose bit is set in `allowed` count; the
// row's max and sum move, its output so far is rescaled, and its probabilities land in `probs` as
// bf16 (0 where not allowed).
LLMINT8_BF16 inline void softmax_step(const float* scores, uint64_t allowed, float& row_max, float& row_sum, float* out, int64_t dim, uint16_t* probs) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 masks[4];
  for (int c = 0; c < 4; ++c) {
    masks[c] = static_cast<__mmask16>(allowed >> (16 * c));
    vmax = _mm512_mask_max_ps(vmax, masks[c], vmax, _mm512_loadu_ps(scores + 16 * c));
  }
  const float new_max = std::max(row_max, _mm512_reduce_max_ps(vmax));
  const float alpha = std::exp(row_max - new_max);  // 0 for the row's first keys (row_max = -inf)
  __m512 vsum = _mm512_setzero_ps();
  const __m512 shift = _mm512_set1_ps(new_max);
  for (int c = 0; c < 4; c += 2) {
    const __m512 p0 = _mm512_maskz_mov_ps(masks[c], exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(masks[c], scores + 16 * c), shift)));
    const __m512 p1 = _mm512_maskz_mov_ps(masks[c + 1], exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(masks[c + 1], scores + 16 * c + 16), shift)));
    vsum = _mm512_add_ps(vsum, _mm512_add_ps(p0, p1));
    // cvtne2ps puts its second operand in the low half
    _mm512_storeu_si512(probs + 16 * c, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
  }
  row_sum = row_sum * alpha + _mm512_reduce_add_ps(vsum);
  row_max = new_max;
  if (alpha != 1.0f) {
    const __m512 a = _mm512_set1_ps(alpha);
    for (int64_t d = 0; d < dim; d += 16) _mm512_storeu_ps(out + d, _mm512_mul_ps(_mm512_loadu_ps(out + d), a));
  }
}

// Which of the 64 keys from `key0` query `row` attends: the mask's bytes (those before `keys`), or
// without a mask the keys at or before the query (causal).
LLMINT8_BF16 inline uint64_t allowed_keys(const bool* mask, int64_t mask_row, int64_t row, int64_t key0, int64_t keys) {
  if (mask == nullptr) {
    const int64_t valid = std::clamp<int64_t>(row - key0 + 1, 0, kKeyBlock);
    return valid == kKeyBlock ? ~uint64_t(0) : (uint64_t(1) << valid) - 1;
  }
  const int64_t left = std::min<int64_t>(kKeyBlock, keys - key0);
  const __mmask64 inside = left == kKeyBlock ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
  const __m512i bytes = _mm512_maskz_loadu_epi8(inside, mask + row * mask_row + key0);
  return _mm512_test_epi8_mask(bytes, bytes);
}

// A row's output: its weighted sum of values over its softmax total, rounded to bf16; 0 for a row
// that attended to nothing (total 0), as SDPA gives it.
LLMINT8_BF16 inline void store_row(const float* sums, float total, int64_t dim, uint16_t* out) {
  const __m512 inverse = _mm512_set1_ps(total > 0.0f ? 1.0f / total : 0.0f);
  for (int64_t d = 0; d < dim; d += 16) {
    const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(sums + d), inverse));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + d), (__m256i)rounded);
  }
}

// Keys [length][dim] (row stride `row`) into [chunks of 16][dim / 2][16][2]; values into [pairs][dim][2].
void pack(const uint16_t* k, const uint16_t* v, int64_t k_row, int64_t v_row, int64_t length, int64_t dim, uint16_t* k_packed, uint16_t* v_packed) {
  for (int64_t j = 0; j < length; ++j)
    for (int64_t d = 0; d < dim; ++d) {
      k_packed[((j / 16) * (dim / 2) + d / 2) * 32 + (j % 16) * 2 + d % 2] = k[j * k_row + d];
      v_packed[((j / 2) * dim + d) * 2 + j % 2] = v[j * v_row + d];
    }
}

// The queries [first, first + rows) of one head against its packed keys and values (`keys` of them),
// causal without a mask, else as the mask's rows say (bool, a row every `mask_row` bytes); a query
// that may attend to no key gets 0, as torch's SDPA gives it.
LLMINT8_BF16 void query_block(const uint16_t* q, int64_t q_row, int64_t first, int64_t rows, const uint16_t* k_packed, const uint16_t* v_packed,
                              int64_t keys, int64_t dim, const bool* mask, int64_t mask_row, float scale, uint16_t* out, int64_t out_row,
                              float* scores, uint16_t* probs, float* sums_out, float* row_max, float* row_sum) {
  std::fill(sums_out, sums_out + rows * dim, 0.0f);
  std::fill(row_max, row_max + rows, -std::numeric_limits<float>::infinity());
  std::fill(row_sum, row_sum + rows, 0.0f);
  const int64_t end = mask == nullptr ? first + rows : keys;  // causal: no key after the last query
  for (int64_t key0 = 0; key0 < end; key0 += kKeyBlock) {
    const uint16_t* key_block = k_packed + key0 * dim;  // key0 / 16 chunks of dim * 16
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const int64_t tile_rows = std::min<int64_t>(kRows, rows - r0);
      uint64_t allowed[kRows], any = 0;
      for (int64_t r = 0; r < tile_rows; ++r) any |= allowed[r] = allowed_keys(mask, mask_row, first + r0 + r, key0, keys);
      if (any == 0) continue;
      const uint16_t* q_tile = q + (first + r0) * q_row;
      if (tile_rows == kRows) {
        score_tile<kRows>(q_tile, q_row, key_block, dim, scale, scores);
      } else {
        for (int64_t r = 0; r < tile_rows; ++r) score_tile<1>(q_tile + r * q_row, q_row, key_block, dim, scale, scores + r * kKeyBlock);
      }
      for (int64_t r = 0; r < tile_rows; ++r) {
        if (allowed[r] == 0) {
          std::fill(probs + r * kKeyBlock, probs + (r + 1) * kKeyBlock, uint16_t(0));
          continue;
        }
        softmax_step(scores + r * kKeyBlock, allowed[r], row_max[r0 + r], row_sum[r0 + r], sums_out + (r0 + r) * dim, dim, probs + r * kKeyBlock);
      }
      const int64_t pairs = (64 - __builtin_clzll(any) + 1) / 2;  // up to the last key any row takes
      const uint16_t* values = v_packed + key0 * dim;  // key0 / 2 pairs of dim * 2
      if (tile_rows == kRows) {
        sum_rows<kRows>(probs, values, dim, pairs, sums_out + r0 * dim);
      } else {
        for (int64_t r = 0; r < tile_rows; ++r) sum_rows<1>(probs + r * kKeyBlock, values, dim, pairs, sums_out + (r0 + r) * dim);
      }
    }
  }
  for (int64_t row = 0; row < rows; ++row) store_row(sums_out + row * dim, row_sum[row], dim, out + (first + row) * out_row);
}

// One query of one head against its keys and values read in place (a decode step: packing would
// cost as much as the attention): float32 scores of the allowed keys (`mask` bytes, or all), their
// softmax, and the float32 sum of the value rows they weigh; 0 where no key is allowed.
LLMINT8_BF16 void single_query(const uint16_t* q, const uint16_t* k, int64_t k_row, const uint16_t* v, int64_t v_row, int64_t keys, int64_t dim,
                               const bool* mask, float scale, uint16_t* out, float* scores, float* sums_out) {
  const float none = -std::numeric_limits<float>::infinity();
  float top = none;
  for (int64_t j = 0; j < keys; ++j) {
    if (mask != nullptr && !mask[j]) {
      scores[j] = none;
      continue;
    }
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 32) {
      const __mmask32 lanes = dim - d >= 32 ? ~__mmask32(0) : __mmask32(0xFFFF);  // dim is a multiple of 16
      acc = _mm512_dpbf16_ps(acc, as_pairs(_mm512_maskz_loadu_epi16(lanes, q + d)), as_pairs(_mm512_maskz_loadu_epi16(lanes, k + j * k_row + d)));
    }
    scores[j] = _mm512_reduce_add_ps(acc) * scale;
    top = std::max(top, scores[j]);
  }
  std::fill(sums_out, sums_out + dim, 0.0f);
  float total = 0.0f;
  if (top != none) {
    const __m512 shift = _mm512_set1_ps(top);
    for (int64_t j = 0; j < keys; j += 16) {
      const __mmask16 lanes = keys - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (keys - j)) - 1);
      const __m512 s = _mm512_maskz_loadu_ps(lanes, scores + j);
      const __mmask16 allowed = _mm512_mask_cmp_ps_mask(lanes, s, _mm512_set1_ps(none), _CMP_NEQ_OQ);
      const __m512 p = _mm512_maskz_mov_ps(allowed, exp_ps(_mm512_sub_ps(s, shift)));
      _mm512_mask_storeu_ps(scores + j, lanes, p);
      total += _mm512_reduce_add_ps(p);
    }
    for (int64_t j = 0; j < keys; ++j) {
      if (scores[j] == 0.0f) continue;
      const __m512 p = _mm512_set1_ps(scores[j]);
      for (int64_t d = 0; d < dim; d += 16) {
        const __m512 value = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j * v_row + d))), 16));
        _mm512_storeu_ps(sums_out + d, _mm512_fmadd_ps(p, value, _mm512_loadu_ps(sums_out + d)));
      }
    }
  }
  store_row(sums_out, total, dim, out);
}

#endif

}  // namespace

bool has_bf16_attention() { return bf16_here(); }

namespace {

// The checks both ops share; the mask, where given, expanded to [batch, heads, queries, keys] with
// its last dimension contiguous.
torch::Tensor checked_mask(const char* op, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const c10::optional<torch::Tensor>& mask) {
  TORCH_CHECK(bf16_here(), op, " needs a CPU with AVX512-BF16");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16, op, " takes bf16");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes(), op, ": q [b, h, l, d], k and v [b, kv, s, d]");
  const int64_t batch = q.size(0), heads = q.size(1), kv_heads = k.size(1);
  TORCH_CHECK(k.size(0) == batch && k.size(3) == q.size(3) && kv_heads > 0 && heads % kv_heads == 0,
              op, ": keys and values of the queries' batch and dim, heads a multiple of their heads");
  TORCH_CHECK(q.size(3) % 16 == 0 && q.size(3) > 0, op, ": the head dim must be a multiple of 16");
  if (!mask.has_value()) return torch::Tensor();
  TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4, op, ": the mask is bool [b or 1, h or 1, queries, keys]");
  auto m = mask->expand({batch, heads, q.size(2), k.size(2)});
  return m.stride(3) == 1 ? m : m.contiguous();
}

const uint16_t* bits(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }

}  // namespace

// q [batch, heads, 1, dim], k and v [batch, kv_heads, keys, dim] (a decode step), mask None (every
// key) or bool broadcastable to [batch, heads, 1, keys] -> [batch, 1, heads, dim]; as prompt_attention
// for the rest, but keys and values read where they are.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, const c10::optional<torch::Tensor>& mask, double scale) {
  auto m = checked_mask("decode_attention", q, k, v, mask);
  TORCH_CHECK(q.size(2) == 1, "decode_attention takes one query");
  k = k.stride(3) == 1 ? k : k.contiguous();
  v = v.stride(3) == 1 ? v : v.contiguous();
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(3), keys = k.size(2), group = heads / k.size(1);
  auto query = q.reshape({batch, heads, dim}).contiguous();
  auto out = torch::empty({batch, 1, heads, dim}, q.options());
#if defined(__GNUC__) && defined(__x86_64__)
  const uint16_t *qd = bits(query), *kd = bits(k), *vd = bits(v);
  uint16_t* od = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const bool* md = m.defined() ? m.data_ptr<bool>() : nullptr;
  at::parallel_for(0, batch * heads, 1, [&](int64_t from, int64_t to) {
    std::vector<float> scores(keys), sums_out(dim);
    for (int64_t t = from; t < to; ++t) {
      const int64_t b = t / heads, h = t % heads, kv = h / group;
      single_query(qd + t * dim, kd + b * k.stride(0) + kv * k.stride(1), k.stride(2), vd + b * v.stride(0) + kv * v.stride(1), v.stride(2), keys, dim,
                   md == nullptr ? nullptr : md + b * m.stride(0) + h * m.stride(1), static_cast<float>(scale), od + t * dim, scores.data(), sums_out.data());
    }
  });
#endif
  return out;
}

// q [batch, heads, queries, dim], k and v [batch, kv_heads, keys, dim] (bf16, heads a multiple of
// kv_heads, dim a multiple of 16), mask None (causal, keys == queries) or bool broadcastable to
// [batch, heads, queries, keys] (true: attend) -> [batch, queries, heads, dim]: SDPA's is_causal or
// attn_mask.
torch::Tensor prompt_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, const c10::optional<torch::Tensor>& mask, double scale) {
  auto m = checked_mask("prompt_attention", q, k, v, mask);
  const int64_t batch = q.size(0), heads = q.size(1), length = q.size(2), dim = q.size(3), kv_heads = k.size(1), keys = k.size(2);
  TORCH_CHECK(mask.has_value() || keys == length, "prompt_attention: causal without a mask needs as many keys as queries");
  q = q.stride(3) == 1 ? q : q.contiguous();
  k = k.stride(3) == 1 ? k : k.contiguous();
  v = v.stride(3) == 1 ? v : v.contiguous();
  auto out = torch::empty({batch, length, heads, dim}, q.options());
#if defined(__GNUC__) && defined(__x86_64__)
  const int64_t padded = (keys + kKeyBlock - 1) / kKeyBlock * kKeyBlock;  // zero keys past the end, never attended
  auto k_packed = torch::zeros({batch, kv_heads, padded, dim}, q.options()), v_packed = torch::zeros({batch, kv_heads, padded, dim}, q.options());
  auto raw_out = [](torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); };
  const uint16_t *qd = bits(q), *kd = bits(k), *vd = bits(v);
  uint16_t *kp = raw_out(k_packed), *vp = raw_out(v_packed), *od = raw_out(out);
  const bool* md = mask.has_value() ? m.data_ptr<bool>() : nullptr;
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t from, int64_t to) {
    for (int64_t t = from; t < to; ++t) {
      const int64_t b = t / kv_heads, h = t % kv_heads;
      pack(kd + b * k.stride(0) + h * k.stride(1), vd + b * v.stride(0) + h * v.stride(1), k.stride(2), v.stride(2), keys, dim,
           kp + t * padded * dim, vp + t * padded * dim);
    }
  });
  const int64_t blocks = (length + kQueryBlock - 1) / kQueryBlock, group = heads / kv_heads;
  // tasks ordered (batch, head, query block): a thread's contiguous share holds every block of its heads, short and long alike
  at::parallel_for(0, batch * heads * blocks, 1, [&](int64_t from, int64_t to) {
    std::vector<float> scores(kRows * kKeyBlock), sums_out(kQueryBlock * dim), row_max(kQueryBlock), row_sum(kQueryBlock);
    std::vector<uint16_t> probs(kRows * kKeyBlock);
    for (int64_t t = from; t < to; ++t) {
      const int64_t b = t / (heads * blocks), h = t / blocks % heads, first = t % blocks * kQueryBlock;
      const int64_t packed_at = (b * kv_heads + h / group) * padded * dim;
      query_block(qd + b * q.stride(0) + h * q.stride(1), q.stride(2), first, std::min(kQueryBlock, length - first), kp + packed_at, vp + packed_at,
                  keys, dim, md == nullptr ? nullptr : md + b * m.stride(0) + h * m.stride(1), md == nullptr ? 0 : m.stride(2),
                  static_cast<float>(scale), od + b * length * heads * dim + h * dim, heads * dim, scores.data(), probs.data(), sums_out.data(),
                  row_max.data(), row_sum.data());
    }
  });
#endif
  return out;
}
