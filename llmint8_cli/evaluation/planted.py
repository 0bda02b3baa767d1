"""Emergent outlier features planted into a small real model, without changing what it computes.

The paper's regime (its §4) starts past 6.7B parameters: a few hidden dimensions carry values 20
to 60 times the rest in almost every layer and sequence. The models llmint8 can evaluate here are
too small to have them, so the fidelity benchmark (bench/planted_outliers.py) makes them: in every
decoder layer, the chosen dimensions of the norm that feeds the attention (or the MLP) are scaled
by `factor`, and the columns of the linears that read that norm's output are divided by it. In
exact arithmetic the model is the same function (the 16-bit perplexity does not move, up to
fp32 rounding); the int8 layers now see `factor`-times larger features in the same dimensions of
every layer, as in the large models.
"""

from __future__ import annotations

import torch
from torch import nn

from llmint8_cli.activations import decoder_layers

PLACES = ("attention", "mlp", "both")
ATTENTION_READERS = ("q_proj", "k_proj", "v_proj", "query_key_value", "c_attn", "qkv_proj")
MLP_READERS = ("gate_proj", "up_proj", "fc1", "c_fc", "dense_h_to_4h", "gate_up_proj")


def _norm_and_readers(layer: nn.Module, place: str) -> tuple[nn.Module, list[nn.Module]]:
    """The norm whose output feeds the attention or the MLP, and the linears that read it."""
    if place == "attention":
        norm = getattr(layer, "input_layernorm", None)
        block, readers = getattr(layer, "self_attn", None), ATTENTION_READERS
    else:  # Gemma's MLP reads pre_feedforward_layernorm; Llama-style layers post_attention_layernorm
        norm = getattr(layer, "pre_feedforward_layernorm", None) or getattr(layer, "post_attention_layernorm", None)
        block, readers = getattr(layer, "mlp", None), MLP_READERS
    linears = [getattr(block, name) for name in readers if block is not None and isinstance(getattr(block, name, None), nn.Linear)]
    if norm is None or getattr(norm, "weight", None) is None or not linears:
        raise ValueError(f"{type(layer).__name__}: no norm with a weight feeding the {place} through a linear layer (supported: Llama, Gemma, Qwen, Mistral)")
    return norm, linears


def plant(model: nn.Module, dims: list[int], factor: float, place: str) -> int:
    """Scale `dims` of the `place` inputs by `factor` in every decoder layer; returns the number of
    norms changed. Gemma's norms multiply by (1 + weight), the others by weight."""
    if place not in PLACES:
        raise ValueError(f"place must be one of {PLACES}, got {place!r}")
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    index = torch.tensor(dims, dtype=torch.long)
    changed = 0
    _, layers = decoder_layers(model)
    with torch.no_grad():
        for layer in layers:
            for part in ("attention", "mlp") if place == "both" else (place,):
                norm, readers = _norm_and_readers(layer, part)
                weight = norm.weight
                offset = 1.0 if "Gemma" in type(norm).__name__ else 0.0
                weight[index] = ((weight[index].double() + offset) * factor - offset).to(weight.dtype)
                for linear in readers:
                    linear.weight[:, index] = (linear.weight[:, index].double() / factor).to(linear.weight.dtype)
                changed += 1
    return changed


def chosen_dims(hidden_size: int, count: int, seed: int = 0) -> list[int]:
    """`count` hidden dimensions drawn without replacement (seeded: the same for every method and magnitude)."""
    if not 1 <= count <= hidden_size:
        raise ValueError(f"count must be between 1 and {hidden_size}, got {count}")
    return sorted(torch.randperm(hidden_size, generator=torch.Generator().manual_seed(seed))[:count].tolist())
