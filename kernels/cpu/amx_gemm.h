// The AMX-INT8 GEMM (amx_gemm.cpp), for the epilogues of int8_gemm.cpp.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <functional>

// finish(row, rows, col, cols, block, ld): C[row : row + rows, col : col + cols] is ready in
// `block`, rows ld int32 apart; called on torch's threads, each block once.
using BlockSink = std::function<void(int64_t, int64_t, int64_t, int64_t, const int32_t*, int64_t)>;

bool has_amx();
torch::Tensor amx_pack(torch::Tensor w);
void amx_gemm_blocks(const torch::Tensor& a, const torch::Tensor& packed, int64_t n, const BlockSink& finish);
torch::Tensor amx_gemm(torch::Tensor a, torch::Tensor packed, int64_t n);
