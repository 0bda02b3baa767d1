"""Mixture-of-experts blocks as one linear layer per expert, so that experts quantize like any other
linear layer, each with its own outlier columns.

transformers keeps a block's experts as two 3-D tensors, `gate_up_proj` (each expert's gate and up
rows, concatenated or interleaved) and `down_proj`, stored [E, out, in] or transposed [E, in, out],
with or without biases, and runs them through a kernel of its choice. `unfuse_experts` replaces
such a module by `LinearExperts`: the same weights as `gate_up_proj.<e>` and `down_proj.<e>` linear
layers, run as transformers' eager loop runs them, its own gate function on each expert's gate_up
output, so the 16-bit model computes the same function, and `quantize_model`, calibration and the
checkpoint format then treat each expert's layers as ordinary linear layers
(`model.layers.0.mlp.experts.gate_up_proj.3.weight`, ...). Two ways of calling experts exist: with
the routed tokens (Mixtral, Qwen2-MoE, gpt-oss and the classes transformers' experts
implementations run) and with every token, already weighted, one slice per expert (Llama-4:
`EveryTokenExperts`).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

FUSED = ("gate_up_proj", "down_proj")
BIASES = tuple(f"{name}_bias" for name in FUSED)


ROUTED_CALL = ["hidden_states", "top_k_index", "top_k_weights"]  # how transformers' experts classes are called, LinearExperts too
EVERY_TOKEN_CALL = ["hidden_states"]  # Llama-4's experts: [E * tokens, hidden], expert e's slice e, each already weighted by its router score


def _call(module: nn.Module) -> list[str] | None:
    """ROUTED_CALL, EVERY_TOKEN_CALL or None: how the experts module is called. A class transformers'
    experts implementations run (use_experts_implementation sets is_concatenated) takes the routed
    tokens whatever its forward names them (gpt-oss: router_indices, routing_weights)."""
    if hasattr(module, "is_concatenated"):
        return ROUTED_CALL
    parameters = list(inspect.signature(type(module).forward).parameters)[1:]
    return parameters if parameters in (ROUTED_CALL, EVERY_TOKEN_CALL) else None


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module whose every expert is a gate_up linear map, its gate function
    (`_apply_gate`, or act(gate) * up), and a down linear map: 3-D `gate_up_proj` and `down_proj`,
    biases where `has_bias`, no norm after each expert, called in one of the two known ways."""
    names = {name for name, _ in module.named_parameters(recurse=False)}
    expected = set(FUSED) | (set(BIASES) if getattr(module, "has_bias", False) else set())
    return (
        names == expected and all(getattr(module, name).dim() == 3 for name in FUSED)
        and (hasattr(module, "act_fn") or hasattr(type(module), "_apply_gate"))
        and getattr(module, "has_gate", True) and not getattr(module, "has_post_expert_norm", False) and _call(module) is not None
    )


def _linears(weights: torch.Tensor, biases: torch.Tensor | None, transposed: bool) -> nn.ModuleList:
    """One linear layer per expert, each holding its slice of the 3-D tensor (a view; a copy where
    the tensor is stored transposed) and of the biases."""
    layers = nn.ModuleList()
    for index, weight in enumerate(weights):
        weight = weight.detach().t().contiguous() if transposed else weight.detach()
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=biases is not None, device="meta", dtype=weight.dtype)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if biases is not None:
            layer.bias = nn.Parameter(biases[index].detach(), requires_grad=False)
        layers.append(layer)
    return layers


class LinearExperts(nn.Module):
    """A block's experts, one `gate_up_proj.<e>` and one `down_proj.<e>` linear layer each, called
    with the routed tokens; `transposed` records how the source stores the 3-D tensors (what
    quantize needs to slice them)."""

    def __init__(self, gate_up_proj: nn.ModuleList, down_proj: nn.ModuleList, act_fn: nn.Module | None, apply_gate, settings: dict, transposed: bool):
        super().__init__()
        self.num_experts = len(gate_up_proj)
        self.gate_up_proj, self.down_proj, self.act_fn = gate_up_proj, down_proj, act_fn
        self.apply_gate, self.transposed = apply_gate, transposed
        for name, value in settings.items():  # what the gate function reads (gpt-oss: alpha, limit)
            setattr(self, name, value)

    @classmethod
    def from_fused(cls, module: nn.Module) -> "LinearExperts":
        transposed = getattr(module, "is_transposed", False) if _call(module) == ROUTED_CALL else True  # Llama-4's multiply x @ W[e]: [E, in, out]
        biases = [getattr(module, name) if getattr(module, "has_bias", False) else None for name in BIASES]
        settings = {name: value for name, value in vars(module).items()
                    if isinstance(value, (int, float, bool)) and not name.startswith("_") and name != "training"}
        apply_gate = getattr(type(module), "_apply_gate", None)
        return cls(_linears(module.gate_up_proj, biases[0], transposed), _linears(module.down_proj, biases[1], transposed), getattr(module, "act_fn", None),
                   apply_gate, settings, transposed)

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `index` on its tokens: gate_up, the experts class's own gate function (the
        concatenated act(gate) * up where it has none), down."""
        gate_up = self.gate_up_proj[index](x)
        if self.apply_gate is not None:
            hidden = self.apply_gate(self, gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = self.act_fn(gate) * up
        return self.down_proj[index](hidden)

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
            out = self.expert(expert, hidden_states[token]) * top_k_weights[token, position, None]
            final.index_add_(0, token, out.to(final.dtype))
        return final


class EveryTokenExperts(LinearExperts):
    """Experts called with every token (Llama-4): [E * tokens, hidden], expert e's slice e, each
    already weighted by its router score; the outputs in the same order (Llama4TextExperts)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        slices = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])
        return torch.cat([self.expert(expert, slices[expert]) for expert in range(self.num_experts)]).view(-1, hidden_states.shape[-1])


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of `model` by LinearExperts in place (on any device, meta
    included); returns how many were replaced."""
    from llmint8_cli.nn.convert import replace_module

    fused = [(name, module) for name, module in model.named_modules() if is_fused_experts(module)]
    for name, module in fused:
        replace_module(model, name, (LinearExperts if _call(module) == ROUTED_CALL else EveryTokenExperts).from_fused(module))
    return len(fused)
