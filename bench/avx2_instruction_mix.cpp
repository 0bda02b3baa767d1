// What bounds an exact int8 product on an AVX2 core: the instruction mix per 32 multiply-accumulates.
//   int8 (llmint8-avx2): vpsignb, vpmaddubsw, vpmaddwd (pairs to int32), vpaddd   (4 instructions)
//   fp32 (MKL/oneDNN):   4 x vfmadd231ps (8 lanes each)                            (4 instructions)
// Each loop runs 8 independent groups, so only throughput counts, not latency; no loads, so the
// ratio is the most an exact AVX2 int8 GEMM can gain over an fp32 one on this core when both are
// compute-bound (bench/results/2026-12-03-default-threshold-and-avx2-ceiling.md).
//   g++ -O2 bench/avx2_instruction_mix.cpp -o /tmp/mix && /tmp/mix      (x86-64 with AVX2 and FMA)
#include <chrono>
#include <cstdio>
#define INT8_GROUP(s, p, acc) "vpsignb %%ymm1, %%ymm0, " s "\n vpmaddubsw " s ", %%ymm2, " p "\n vpmaddwd %%ymm3, " p ", " p "\n vpaddd " p ", " acc ", " acc "\n"
#define FP32_GROUP(a, b, c, d) "vfmadd231ps %%ymm1, %%ymm0, " a "\n vfmadd231ps %%ymm1, %%ymm0, " b "\n vfmadd231ps %%ymm1, %%ymm0, " c "\n vfmadd231ps %%ymm1, %%ymm0, " d "\n"
#define CLOBBER "xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","xmm10","xmm11","xmm12","xmm13","xmm14","xmm15"
template <class F> double seconds(F f) { auto s = std::chrono::steady_clock::now(); f(); return std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count(); }
int main() {
  const long N = 100000000;  // iterations of 8 groups of 32 MACs
  asm volatile("vpxor %%ymm0, %%ymm0, %%ymm0\n vpxor %%ymm1, %%ymm1, %%ymm1\n vpxor %%ymm2, %%ymm2, %%ymm2\n vpxor %%ymm3, %%ymm3, %%ymm3" ::: "xmm0", "xmm1", "xmm2", "xmm3");
  double int8 = seconds([&] { long n = N; asm volatile("1:\n"
      INT8_GROUP("%%ymm4", "%%ymm5", "%%ymm12") INT8_GROUP("%%ymm6", "%%ymm7", "%%ymm13") INT8_GROUP("%%ymm8", "%%ymm9", "%%ymm14") INT8_GROUP("%%ymm10", "%%ymm11", "%%ymm15")
      INT8_GROUP("%%ymm4", "%%ymm5", "%%ymm12") INT8_GROUP("%%ymm6", "%%ymm7", "%%ymm13") INT8_GROUP("%%ymm8", "%%ymm9", "%%ymm14") INT8_GROUP("%%ymm10", "%%ymm11", "%%ymm15")
      "dec %0\n jnz 1b\n" : "+r"(n) :: CLOBBER); });
  double fp32 = seconds([&] { long n = N; asm volatile("1:\n"
      FP32_GROUP("%%ymm4", "%%ymm5", "%%ymm6", "%%ymm7") FP32_GROUP("%%ymm8", "%%ymm9", "%%ymm10", "%%ymm11") FP32_GROUP("%%ymm12", "%%ymm13", "%%ymm14", "%%ymm15") FP32_GROUP("%%ymm4", "%%ymm5", "%%ymm6", "%%ymm7")
      FP32_GROUP("%%ymm8", "%%ymm9", "%%ymm10", "%%ymm11") FP32_GROUP("%%ymm12", "%%ymm13", "%%ymm14", "%%ymm15") FP32_GROUP("%%ymm4", "%%ymm5", "%%ymm6", "%%ymm7") FP32_GROUP("%%ymm8", "%%ymm9", "%%ymm10", "%%ymm11")
      "dec %0\n jnz 1b\n" : "+r"(n) :: CLOBBER); });
  const double macs = 8.0 * 32 * N;
  printf("{\"int8_gmac_per_s\": %.1f, \"fp32_gmac_per_s\": %.1f, \"int8_over_fp32\": %.2f}\n", macs / int8 / 1e9, macs / fp32 / 1e9, fp32 / int8);
}
