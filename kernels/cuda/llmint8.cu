// LLM.int8() decomposed matmul on NVIDIA GPUs, loaded with cupy.RawModule (see backends/cuda.py).
//
// Numerics are those of llmint8_cli/core/reference.py, bit for bit up to the final fp32 sums:
//   inv = 127 / absmax (IEEE division, 0 when absmax == 0), q = rint(x * inv) (half to even),
//   scale = absmax / 127; C = sx[i] * sw[j] * acc[i, j]; Y = C + X[:, O] W[:, O]^T + bias.
// T is the activation type: __half, __nv_bfloat16 or float (instantiated by name expressions).

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 1. flags[c] = 1 for every column holding |x| >= threshold, NaN or Inf (!(|x| < t) covers all),
//    and for the stored outlier columns (preset by the caller). One read of X, no atomics needed:
//    every writer stores the same value.
template <typename T>
__global__ void detect_outlier_columns(const T* __restrict__ x, long long m, int k, float threshold, int* __restrict__ flags) {
  const long long total = m * (long long)k;
  for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total; e += (long long)gridDim.x * blockDim.x) {
    if (!(fabsf(to_f32(x[e])) < threshold)) flags[e % k] = 1;
  }
}

// 2. Ordered compaction of the flagged columns into idx[0..count) on the device (one block of
//    1024 threads, a shared-memory scan per tile): the host never waits for the outlier count.
__global__ void compact_columns(const int* __restrict__ flags, int k, int* __restrict__ idx, int* __restrict__ count) {
  __shared__ int scan[1024];
  __shared__ int base;
  if (threadIdx.x == 0) base = 0;
  __syncthreads();
  for (int tile = 0; tile < k; tile += blockDim.x) {
    const int c = tile + threadIdx.x;
    const int flag = (c < k) ? flags[c] : 0;
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

// 3. One block per row: absmax over the columns not flagged, then int8 values and the row scale.
template <typename T>
__global__ void quantize_rows(const T* __restrict__ x, int k, const int* __restrict__ flags, signed char* __restrict__ q, float* __restrict__ scale) {
  __shared__ float partial[32];
  const long long row = blockIdx.x;
  const T* xr = x + row * k;
  float local = 0.0f;
  for (int c = threadIdx.x; c < k; c += blockDim.x)
    if (!flags[c]) local = fmaxf(local, fabsf(to_f32(xr[c])));
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
    const float v = flags[c] ? 0.0f : rintf(__fmul_rn(to_f32(xr[c]), inv));
    q[row * k + c] = (signed char)fminf(127.0f, fmaxf(-127.0f, v));
  }
  if (threadIdx.x == 0) scale[row] = __fdiv_rn(absmax, 127.0f);
}

// 4. int8 x int8 -> int32 on tensor cores (WMMA 16x16x16): C[m, n] = A[m, k] B[n, k]^T.
//    Each warp computes one 16x16 tile; k, m and n must be multiples of 16 (the caller pads or
//    uses cuBLASLt). B's rows are A-style rows, read as a column-major K x N matrix.
__global__ void int8_gemm_wmma(const signed char* __restrict__ a, const signed char* __restrict__ b, int* __restrict__ c, int m, int n, int k) {
  using namespace nvcuda;
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int tiles_n = n / 16;
  const int tile_m = warp / tiles_n, tile_n = warp % tiles_n;
  if (tile_m * 16 >= m) return;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, int> fc;
  wmma::fill_fragment(fc, 0);
  for (int t = 0; t < k; t += 16) {
    wmma::load_matrix_sync(fa, a + (long long)tile_m * 16 * k + t, k);
    wmma::load_matrix_sync(fb, b + (long long)tile_n * 16 * k + t, k);
    wmma::mma_sync(fc, fa, fb, fc);
  }
  wmma::store_matrix_sync(c + (long long)tile_m * 16 * n + tile_n * 16, fc, n, wmma::mem_row_major);
}

// 5. Epilogue, one thread per output: dequantize, add the 16-bit product over the outlier columns
//    only (their count is read on the device) and the bias, write T. Stored outlier columns come
//    from w_out (exact 16-bit), run-time ones from the dequantized int8 weight.
template <typename T>
__global__ void epilogue(const int* __restrict__ acc, const float* __restrict__ sx, const float* __restrict__ sw,
                         const T* __restrict__ x, const int* __restrict__ idx, const int* __restrict__ count,
                         const int* __restrict__ stored_pos, const T* __restrict__ w_out, int n_stored,
                         const signed char* __restrict__ qw, const T* __restrict__ bias, int has_bias,
                         long long m, int n, int k, T* __restrict__ out) {
  const long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (e >= m * n) return;
  const long long i = e / n;
  const int j = e % n;
  float y = (float)acc[e] * (sx[i] * sw[j]);
  const int outliers = *count;
  float extra = 0.0f;
  for (int o = 0; o < outliers; ++o) {
    const int col = idx[o];
    const int pos = stored_pos[col];
    const float w = pos >= 0 ? to_f32(w_out[(long long)j * n_stored + pos]) : (float)qw[(long long)j * k + col] * sw[j];
    extra += to_f32(x[i * k + col]) * w;
  }
  y += extra;
  if (has_bias) y += to_f32(bias[j]);
  out[e] = from_f32<T>(y);
}
