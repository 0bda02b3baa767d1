// Exact int8 x int8 -> int32 GEMM on Intel AMX-INT8 tiles (Sapphire Rapids and later).
//
//   C[i, j] = sum_k A[i, k] * W[j, k]
//
// TDPBSSD multiplies a 16 x 64 tile of signed bytes by a 16 x 64 "VNNI" tile of signed bytes
// (row r holds, for each of 16 output columns j, the 4 weights w[j][4r .. 4r + 3]) and adds the
// products into a 16 x 16 tile of int32: signed x signed, no pairs in int16, so every sum is
// exact. W is reordered once into such tiles (`amx_pack`); A is copied into 16-row tiles at each
// call (a few % of the time), zero-padded to whole tiles in m and k. Eight tile registers give a
// 2 x 2 block of C tiles (32 x 32 int32) fed by two A and two W tiles per step of 64 in k.
// Threads split W's 32-column panels; each thread walks A in 256-row slabs that stay in L2 while
// its panels pass over them, and hands each finished strip (slab rows x 128 columns, in L2) to a
// caller's sink (amx_linear finishes the layer's output there). On a 2-core AMX Xeon, 4096 x 4096,
// m = 16-128: 1.3-1.5x oneDNN's fastest int8 path in the same process
// (bench/results/2026-12-05-amx-int8-gemm.md).

#include "amx_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__linux__) && ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define LLMINT8_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t kTileRows = 16;   // rows of an A or C tile, output columns of a W tile
constexpr int64_t kTileBytes = 64;  // k per tile step
constexpr int64_t kTile = kTileRows * kTileBytes;
constexpr int64_t kSlabRows = 256;  // rows of A kept in L2 while a thread's W panels pass
constexpr int64_t kPanel = 2 * kTileRows;  // columns of C per W panel (two W tiles)
constexpr int64_t kPrefetchTiles = 2;  // A and W tiles (k steps) fetched ahead
constexpr int64_t kStripPanels = 4;  // W panels per strip of C handed to the sink: slab rows x 128 int32 in L2

int64_t tiles(int64_t size, int64_t width) { return (size + width - 1) / width; }

#if defined(LLMINT8_AMX)
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands a process AMX's 8 KB of tile state only on request (ARCH_REQ_XCOMP_PERM, 5.16+).
bool amx_usable() {
  static const bool usable = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return false;  // AMX-TILE, AMX-INT8
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return usable;
}

__attribute__((target("amx-tile"))) void load_tile_config() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = kTileBytes;
    config.rows[t] = kTileRows;
  }
  __asm__ __volatile__("" : : "r"(&config) : "memory");  // GCC 12 drops the stores above: it does not see ldtilecfg read them
  _tile_loadconfig(&config);
}

// One block of C over the whole of k, ROWS A tiles x COLS W tiles, stored to `c` (rows ldc apart).
// Tiles 0-3 accumulate C, 4-5 hold A, 6-7 hold W (tile numbers must be immediates).
template <int ROWS, int COLS>
__attribute__((target("amx-tile,amx-int8"))) void block(const int8_t* a, const int8_t* w, int64_t k_tiles, int32_t* c, int64_t ldc, bool fetch_w) {
  const int8_t* a1 = a + k_tiles * kTile;
  const int8_t* w1 = w + k_tiles * kTile;
  _tile_zero(0);
  if constexpr (COLS == 2) _tile_zero(1);
  if constexpr (ROWS == 2) _tile_zero(2);
  if constexpr (ROWS == 2 && COLS == 2) _tile_zero(3);
  for (int64_t t = 0; t < k_tiles; ++t) {
    if (fetch_w)  // W's first pass through the slab comes from memory: ask for it ahead (1.1-1.3x at m <= 128)
      for (int64_t line = 0; line < kTile; line += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(w + (t + kPrefetchTiles) * kTile + line), _MM_HINT_T0);
        if constexpr (COLS == 2) _mm_prefetch(reinterpret_cast<const char*>(w1 + (t + kPrefetchTiles) * kTile + line), _MM_HINT_T0);
      }
    for (int64_t line = 0; line < kTile; line += 64) {  // A comes from L2 on every pass: into L1 ahead (median 5-10 %)
      _mm_prefetch(reinterpret_cast<const char*>(a + (t + kPrefetchTiles) * kTile + line), _MM_HINT_T0);
      if constexpr (ROWS == 2) _mm_prefetch(reinterpret_cast<const char*>(a1 + (t + kPrefetchTiles) * kTile + line), _MM_HINT_T0);
    }
    _tile_loadd(4, a + t * kTile, kTileBytes);
    _tile_loadd(6, w + t * kTile, kTileBytes);
    if constexpr (ROWS == 2) _tile_loadd(5, a1 + t * kTile, kTileBytes);
    if constexpr (COLS == 2) _tile_loadd(7, w1 + t * kTile, kTileBytes);
    _tile_dpbssd(0, 4, 6);
    if constexpr (COLS == 2) _tile_dpbssd(1, 4, 7);
    if constexpr (ROWS == 2) _tile_dpbssd(2, 5, 6);
    if constexpr (ROWS == 2 && COLS == 2) _tile_dpbssd(3, 5, 7);
  }
  const int64_t stride = ldc * sizeof(int32_t), below = kTileRows * ldc;
  _tile_stored(0, c, stride);
  if constexpr (COLS == 2) _tile_stored(1, c + kTileRows, stride);
  if constexpr (ROWS == 2) _tile_stored(2, c + below, stride);
  if constexpr (ROWS == 2 && COLS == 2) _tile_stored(3, c + below + kTileRows, stride);
}

__attribute__((target("amx-tile"))) void release_tiles() { _tile_release(); }
#else
bool amx_usable() { return false; }
#endif

// Tiles of 16 rows x 64 bytes, zero-padded: src [rows, k] row-major -> [row tiles][k tiles][16][64].
void copy_to_tiles(const int8_t* src, int64_t rows, int64_t k, int8_t* dst) {
  const int64_t k_tiles = tiles(k, kTileBytes);
  at::parallel_for(0, tiles(rows, kTileRows), 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t t = 0; t < k_tiles; ++t) {
        int8_t* tile = dst + (g * k_tiles + t) * kTile;
        const int64_t width = std::min(kTileBytes, k - t * kTileBytes);
        for (int64_t r = 0; r < kTileRows; ++r) {
          const int64_t row = g * kTileRows + r;
          int8_t* out = tile + r * kTileBytes;
          if (row < rows && width == kTileBytes) {  // a constant size: one 64-byte move, not a call
            std::memcpy(out, src + row * k + t * kTileBytes, kTileBytes);
            continue;
          }
          if (row < rows) std::memcpy(out, src + row * k + t * kTileBytes, width);
          std::memset(out + (row < rows ? width : 0), 0, row < rows ? kTileBytes - width : kTileBytes);
        }
      }
  });
}

}  // namespace

bool has_amx() { return amx_usable(); }

// W [n, k] int8 -> [n tiles, k tiles, 16, 64] int8 in TDPBSSD's layout: row r of a tile holds,
// for each output column j of the tile, w[j][4r .. 4r + 3] of that k step.
torch::Tensor amx_pack(torch::Tensor w) {
  TORCH_CHECK(w.dtype() == torch::kInt8 && w.dim() == 2 && w.is_contiguous(), "amx_pack: a contiguous int8 [n, k] weight expected");
  const int64_t n = w.size(0), k = w.size(1), n_tiles = tiles(n, kTileRows), k_tiles = tiles(k, kTileBytes);
  auto packed = torch::zeros({n_tiles, k_tiles, kTileRows, kTileBytes}, w.options());
  const int8_t* W = w.data_ptr<int8_t>();
  int8_t* P = packed.data_ptr<int8_t>();
  at::parallel_for(0, n_tiles, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t j = 0; j < kTileRows && g * kTileRows + j < n; ++j) {
        const int8_t* row = W + (g * kTileRows + j) * k;
        for (int64_t q = 0; q < k; ++q)
          P[(g * k_tiles + q / kTileBytes) * kTile + (q % kTileBytes) / 4 * kTileBytes + 4 * j + q % 4] = row[q];
      }
  });
  return packed;
}

void amx_gemm_blocks(const torch::Tensor& a, const torch::Tensor& packed, int64_t n, const BlockSink& finish) {
  TORCH_CHECK(amx_usable(), "amx_gemm: this CPU or kernel offers no AMX-INT8");
  TORCH_CHECK(a.dtype() == torch::kInt8 && a.dim() == 2 && a.is_contiguous(), "amx_gemm: a contiguous int8 [m, k] input expected");
  TORCH_CHECK(packed.dim() == 4 && packed.size(0) == tiles(n, kTileRows) && packed.size(1) == tiles(a.size(1), kTileBytes),
              "amx_gemm: the packed weight does not match the input");
  const int64_t m = a.size(0), k = a.size(1), k_tiles = packed.size(1), n_tiles = packed.size(0), row_tiles = tiles(m, kTileRows);
  thread_local std::vector<int8_t> a_tiles;  // reused: a fresh buffer of m x k bytes costs its page faults at every call
  a_tiles.resize(row_tiles * k_tiles * kTile);
  copy_to_tiles(a.data_ptr<int8_t>(), m, k, a_tiles.data());
#if defined(LLMINT8_AMX)
  const int8_t* A = a_tiles.data();
  const int8_t* W = packed.data_ptr<int8_t>();
  const int64_t slab = kSlabRows / kTileRows, ld = kStripPanels * kPanel;
  at::parallel_for(0, tiles(n_tiles, 2), 1, [&](int64_t p0, int64_t p1) {
    thread_local std::vector<int32_t> strip;
    strip.resize(kSlabRows * ld);
    load_tile_config();
    for (int64_t r0 = 0; r0 < row_tiles; r0 += slab) {
      const int64_t r1 = std::min(row_tiles, r0 + slab);
      for (int64_t s0 = p0; s0 < p1; s0 += kStripPanels) {
        const int64_t s1 = std::min(p1, s0 + kStripPanels);
        for (int64_t p = s0; p < s1; ++p) {
          const int8_t* w = W + 2 * p * k_tiles * kTile;
          const bool two_cols = 2 * p + 1 < n_tiles;
          for (int64_t r = r0; r < r1; r += 2) {
            const int8_t* rows_a = A + r * k_tiles * kTile;
            int32_t* c = strip.data() + (r - r0) * kTileRows * ld + (p - s0) * kPanel;
            const bool two_rows = r + 1 < r1, fetch_w = r == r0;
            if (two_rows && two_cols) block<2, 2>(rows_a, w, k_tiles, c, ld, fetch_w);
            else if (two_rows) block<2, 1>(rows_a, w, k_tiles, c, ld, fetch_w);
            else if (two_cols) block<1, 2>(rows_a, w, k_tiles, c, ld, fetch_w);
            else block<1, 1>(rows_a, w, k_tiles, c, ld, fetch_w);
          }
        }
        const int64_t row = r0 * kTileRows, col = s0 * kPanel;
        finish(row, std::min(m, r1 * kTileRows) - row, col, std::min(n, s1 * kPanel) - col, strip.data(), ld);
      }
    }
    release_tiles();
  });
#endif
}

// a: [m, k] int8, packed: amx_pack(w) of a weight with n rows -> [m, n] int32.
torch::Tensor amx_gemm(torch::Tensor a, torch::Tensor packed, int64_t n) {
  auto c = torch::empty({a.size(0), n}, a.options().dtype(torch::kInt32));
  int32_t* C = c.data_ptr<int32_t>();
  amx_gemm_blocks(a, packed, n, [&](int64_t row, int64_t rows, int64_t col, int64_t cols, const int32_t* block, int64_t ld) {
    for (int64_t i = 0; i < rows; ++i) std::memcpy(C + (row + i) * n + col, block + i * ld, cols * sizeof(int32_t));
  });
  return c;
}
