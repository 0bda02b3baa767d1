"""Mixture-of-experts blocks as one linear layer per expert, so that experts quantize like any other
linear layer, each with its own outlier columns.

transformers keeps a block's experts as two 3-D tensors (`gate_up_proj` [E, 2I, H] and
`down_proj` [E, H, I], the experts classes of Mixtral, Qwen2-MoE and the models built like them)
and runs them through a kernel of its choice. `unfuse_experts` replaces such a module by
`LinearExperts`: the same weights as `gate_up_proj.<e>` and `down_proj.<e>` linear layers, run as
transformers' eager loop runs them, so the 16-bit model computes the same function, and
`quantize_model`, calibration and the checkpoint format then treat each expert's layers as
ordinary linear layers (`model.layers.0.mlp.experts.gate_up_proj.3.weight`, ...).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

FUSED = ("gate_up_proj", "down_proj")


ROUTED_CALL = ["hidden_states", "top_k_index", "top_k_weights"]  # how transformers' experts classes are called, LinearExperts too


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module in the layout LinearExperts reproduces: concatenated
    [gate; up] rows, not transposed, no biases, no norm after each expert, called with the routed
    tokens (Llama-4's experts take every token, each expert's share already weighted: not this)."""
    names = {name for name, _ in module.named_parameters(recurse=False)}
    return (
        names == set(FUSED) and all(getattr(module, name).dim() == 3 for name in FUSED) and hasattr(module, "act_fn")
        and getattr(module, "has_gate", True) and not getattr(module, "has_bias", False) and not getattr(module, "is_transposed", False)
        and getattr(module, "is_concatenated", True) and not getattr(module, "has_post_expert_norm", False)
        and list(inspect.signature(type(module).forward).parameters)[1:] == ROUTED_CALL
    )


def _linears(weights: torch.Tensor) -> nn.ModuleList:
    """One bias-free linear layer per expert, each holding (a view of) its slice of the 3-D tensor."""
    layers = nn.ModuleList()
    for weight in weights:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
        layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
        layers.append(layer)
    return layers


class LinearExperts(nn.Module):
    """A block's experts, one `gate_up_proj.<e>` and one `down_proj.<e>` linear layer each."""

    def __init__(self, gate_up_proj: nn.ModuleList, down_proj: nn.ModuleList, act_fn: nn.Module):
        super().__init__()
        self.num_experts = len(gate_up_proj)
        self.gate_up_proj, self.down_proj, self.act_fn = gate_up_proj, down_proj, act_fn

    @classmethod
    def from_fused(cls, module: nn.Module) -> "LinearExperts":
        return cls(_linears(module.gate_up_proj), _linears(module.down_proj), module.act_fn)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """transformers' eager experts loop (modeling_mixtral.MixtralExperts), a layer per expert.

        The loop runs over every expert, a number fixed by the model, and each takes the tokens
        routed to it, however many: traced with torch._dynamo's capture_dynamic_output_shape_ops
        (what `compiled` in llmint8 sets), a whole block is one graph. Eager, an expert no token
        chose is skipped, as transformers skips it."""
        final = torch.zeros_like(hidden_states)
        routed = top_k_index.t()  # [k, tokens]
        for expert in range(self.num_experts):
            position, token = torch.where(routed == expert)
            if not torch.compiler.is_compiling() and not token.numel():
                continue
            gate, up = self.gate_up_proj[expert](hidden_states[token]).chunk(2, dim=-1)
            out = self.down_proj[expert](self.act_fn(gate) * up) * top_k_weights[token, position, None]
            final.index_add_(0, token, out.to(final.dtype))
        return final


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of `model` by LinearExperts in place (on any device, meta
    included); returns how many were replaced."""
    from llmint8_cli.nn.convert import replace_module

    fused = [(name, module) for name, module in model.named_modules() if is_fused_experts(module)]
    for name, module in fused:
        replace_module(model, name, LinearExperts.from_fused(module))
    return len(fused)
