// A prompt's and a decode step's attention on AVX512-BF16 (attention.cpp), registered beside the int8 kernels.
#pragma once

#include <torch/extension.h>

bool has_bf16_attention();
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, const c10::optional<torch::Tensor>& mask, double scale);
torch::Tensor prompt_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, const c10::optional<torch::Tensor>& mask, double scale);
