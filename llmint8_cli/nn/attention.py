"""The attention of the models llmint8 loads on the CPU: transformers' SDPA, except in bf16 on CPUs
with AVX512-BF16, where a prompt's attention (causal or masked) runs the native kernel
`llmint8_cpu::prompt_attention` (kernels/cpu/attention.cpp: 3x torch's CPU flash attention at
128-512 tokens on Zen 4, where attention was a quarter of a 512-token SmolLM2 prefill) and a decoded
token's `llmint8_cpu::decode_attention` (keys and values read in place).

It is transformers' attention interface under its own name with SDPA's masks, so a model takes it
by name (`use_native_attention`) and nothing else in the process changes; every call it does not
cover (another dtype or device, a float mask, gradients, export) goes to SDPA unchanged."""

from __future__ import annotations

import torch
from torch import nn

NAME = "llmint8_sdpa"


def covered(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, dropout: float, is_causal, extra: dict) -> bool:
    """Whether a native kernel computes this call: bf16 CPU tensors it can lay out, a prompt causal
    (SDPA's is_causal case) or a decoded token over all its keys (SDPA's case without a mask), or
    either under a boolean mask, with nothing SDPA would add to the scores."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    batch, heads, queries = query.shape[:3]
    mask_fits = attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.dim() == 4 and (
        attention_mask.shape[0] in (1, batch) and attention_mask.shape[1] in (1, heads) and attention_mask.shape[2:] == (queries, key.shape[2]))
    return (query.device.type == "cpu" and query.dtype == key.dtype == value.dtype == torch.bfloat16
            and (mask_fits if attention_mask is not None else queries == 1 or causal and key.shape[2] >= queries)
            and dropout == 0.0 and query.shape[-1] == key.shape[-1] == value.shape[-1] and query.shape[-1] % 16 == 0
            and key.shape[0] == batch and heads % key.shape[1] == 0  # (SDPA broadcasts a batch of 1 queries; the kernel does not)
            and all(extra.get(name) is None for name in ("softcap", "position_bias", "s_aux", "sinks"))
            and not extra.get("output_attentions", False)
            and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))  # no backward here
            and not torch.compiler.is_exporting())  # an exported program keeps the device-free SDPA


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, dropout: float = 0.0,
              scaling: float | None = None, is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention function: [batch, heads, length, dim] in, [batch, length, heads, dim] out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not covered(module, query, key, value, attention_mask, dropout, is_causal, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if query.shape[2] == 1:
        return torch.ops.llmint8_cpu.decode_attention(query, key, value, attention_mask, scale), None
    if attention_mask is None:  # causal: an empty static cache's keys past the prompt are never attended (SDPA crops them too)
        key, value = key[:, :, :query.shape[2]], value[:, :, :query.shape[2]]
    return torch.ops.llmint8_cpu.prompt_attention(query, key, value, attention_mask, scale), None


def native_attention_here() -> bool:
    """Whether this CPU and build run the kernel (AVX512-BF16, the native kernels compiled)."""
    from llmint8_cli.backends import cpu_kernels

    native = cpu_kernels.native_kernels()
    return native is not None and native.has_bf16_attention()


def register() -> None:
    """The attention function under its own name, with SDPA's boolean masks (a name without a mask
    function would get none: transformers then skips masking altogether)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_native_attention(model: nn.Module) -> nn.Module:
    """The model's SDPA attention (transformers' default) switched to llmint8's where the kernel runs
    here and the model is on the CPU; any other choice (eager, flex, flash) is the user's and stays."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" or model.device.type != "cpu" or not native_attention_here():
        return model
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError, AttributeError):  # a model whose code does not take transformers' attention interface
        pass
    return model
