// LLM.int8() decomposed matmul on NVIDIA GPUs, loaded with cupy.RawModule (see backends/cuda.py).
//
// Numerics are those of llmint8_cli/core/reference.py, bit for bit up to the final fp32 sums:
//   inv = 127 / absmax (IEEE division, 0 when absmax == 0), q = rint(x * inv) (half to even),
//   scale = absmax / 127; C = sx[i] * sw[j] * acc[i, j]; Y = C + X[:, O] W[:, O]^T + bias.
// T is the activation type: __half, __nv_bfloat16 or float (instantiated by name expressions).
//
// The rows of X come from `groups` sequences of rows_per_group rows each, and every sequence has
// its own outlier columns (flags[g, k]), as in the reference's each_sequence: one int8 GEMM
// serves the batch and no sequence's output depends on what it is batched with. Nothing here
// waits on the host: outlier counts stay on the device, so a decode step can be a CUDA graph.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 1. flags[g, c] = 1 for every column of sequence g holding |x| >= threshold, NaN or Inf
//    (!(|x| < t) covers all); the stored outlier columns are preset by the caller. One read of X,
//    no atomics needed: every writer stores the same value. Quantizing needs a second read: a
//    row's absmax leaves out the columns flagged by any row of its sequence.
template <typename T>
__global__ void detect_outlier_columns(const T* __restrict__ x, long long m, int k, float threshold, long long rows_per_group, int* __restrict__ flags) {
  const long long total = m * (long long)k;
  for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total; e += (long long)gridDim.x * blockDim.x) {
    if (!(fabsf(to_f32(x[e])) < threshold)) flags[(e / k) / rows_per_group * k + e % k] = 1;
  }
}

// 2. Ordered compaction, on the device, of the columns flagged in any sequence and not excluded
//    (the stored columns, which the epilogue reads from their own list) into idx[0..count): one
//    block of 1024 threads, a shared-memory scan per tile.
__global__ void compact_columns(const int* __restrict__ flags, int groups, int k, const int* __restrict__ exclude, int* __restrict__ idx, int* __restrict__ count) {
  __shared__ int scan[1024];
  __shared__ int base;
  if (threadIdx.x == 0) base = 0;
  __syncthreads();
  for (int tile = 0; tile < k; tile += blockDim.x) {
    const int c = tile + threadIdx.x;
    int flag = 0;
    if (c < k && !exclude[c])
      for (int g = 0; g < groups && !flag; ++g) flag = flags[(long long)g * k + c];
    scan[threadIdx.x] = flag;
    __syncthreads();
    for (int offset = 1; offset < blockDim.x; offset <<= 1) {
      const int add = threadIdx.x >= offset ? scan[threadIdx.x - offset] : 0;
      __syncthreads();
      scan[threadIdx.x] += add;
      __syncthreads();
    }
    if (flag) idx[base + scan[threadIdx.x] - 1] = c;
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) base += scan[threadIdx.x];
    __syncthreads();
  }
  if (threadIdx.x == 0) *count = base;
}

// 3. One block per row: absmax over the columns its sequence does not flag, then int8 values and
//    the row scale (the row stays in L1/L2 between the two reads).
template <typename T>
__global__ void quantize_rows(const T* __restrict__ x, int k, long long rows_per_group, const int* __restrict__ flags, signed char* __restrict__ q,
                              float* __restrict__ scale) {
  __shared__ float partial[32];
  const long long row = blockIdx.x;
  const T* xr = x + row * k;
  const int* fr = flags + row / rows_per_group * k;
  float local = 0.0f;
  for (int c = threadIdx.x; c < k; c += blockDim.x)
    if (!fr[c]) local = fmaxf(local, fabsf(to_f32(xr[c])));
  for (int offset = 16; offset > 0; offset >>= 1) local = fmaxf(local, __shfl_xor_sync(0xffffffff, local, offset));
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = local;
  __syncthreads();
  if (threadIdx.x < 32) {
    local = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) local = fmaxf(local, __shfl_xor_sync(0xffffffff, local, offset));
    if (threadIdx.x == 0) partial[0] = local;
  }
  __syncthreads();
  const float absmax = partial[0];
  const float inv = absmax > 0.0f ? __fdiv_rn(127.0f, absmax) : 0.0f;
  for (int c = threadIdx.x; c < k; c += blockDim.x) {
    const float v = fr[c] ? 0.0f : rintf(__fmul_rn(to_f32(xr[c]), inv));
    q[row * k + c] = (signed char)fminf(127.0f, fmaxf(-127.0f, v));
  }
  if (threadIdx.x == 0) scale[row] = __fdiv_rn(absmax, 127.0f);
}

// 4. The epilogue, fused with the 16-bit product over the outlier columns: a 64x64 output tile
//    per block of 256 threads (32 x 8, each 8 rows x 2 columns, reads of acc coalesced), the
//    outlier columns gathered 16 at a time into shared memory and multiplied there in fp32
//    (exact 16-bit inputs): the stored columns first (stored_rows, [n_stored, n], prepared once
//    at load), then the run-time ones (idx[0..*count), their weight dequantized from int8 as it
//    is gathered), masked per sequence. Each output sums its columns in that fixed order, so a
//    row gets the same bits whatever else is in the batch. Then the row and column scales and the
//    bias, in one write of Y. The loop ends at the device-side count: no capacity, no host.
constexpr int kTile = 64, kSlots = 16, kThreads = 256;

template <typename T>
__global__ void epilogue(const int* __restrict__ acc, const float* __restrict__ sx, const float* __restrict__ sw, const T* __restrict__ x,
                         long long rows_per_group, const int* __restrict__ flags, const int* __restrict__ stored_columns,
                         const float* __restrict__ stored_rows, int n_stored, const int* __restrict__ idx, const int* __restrict__ count,
                         const signed char* __restrict__ qw, const T* __restrict__ bias, int has_bias, long long m, int n, int k,
                         T* __restrict__ out) {
  __shared__ float xs[kSlots][kTile];
  __shared__ float ws[kSlots][kTile];
  const int tiles_n = (n + kTile - 1) / kTile;
  const long long row0 = (long long)(blockIdx.x / tiles_n) * kTile;
  const int col0 = (blockIdx.x % tiles_n) * kTile;
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  float sum[8][2] = {};
  const int slots = n_stored + *count;
  for (int s0 = 0; s0 < slots; s0 += kSlots) {
    for (int e = threadIdx.x; e < kSlots * kTile; e += kThreads) {
      const int s = s0 + e / kTile, r = e % kTile;
      const long long row = row0 + r;
      const int j = col0 + r;
      float xv = 0.0f, wv = 0.0f;
      if (s < slots) {
        const bool stored = s < n_stored;
        const int c = stored ? stored_columns[s] : idx[s - n_stored];
        if (row < m && (stored || flags[row / rows_per_group * k + c])) xv = to_f32(x[row * k + c]);
        if (j < n) wv = stored ? stored_rows[(long long)s * n + j] : (float)qw[(long long)j * k + c] * sw[j];
      }
      xs[e / kTile][r] = xv;
      ws[e / kTile][r] = wv;
    }
    __syncthreads();
    for (int s = 0; s < kSlots; ++s)
      for (int a = 0; a < 8; ++a)
        for (int b = 0; b < 2; ++b) sum[a][b] += xs[s][ty + 8 * a] * ws[s][tx + 32 * b];
    __syncthreads();
  }
  for (int a = 0; a < 8; ++a) {
    const long long i = row0 + ty + 8 * a;
    for (int b = 0; b < 2; ++b) {
      const int j = col0 + tx + 32 * b;
      if (i >= m || j >= n) continue;
      float y = (float)acc[i * n + j] * (sx[i] * sw[j]) + sum[a][b];
      if (has_bias) y += to_f32(bias[j]);
      out[i * n + j] = from_f32<T>(y);
    }
  }
}
