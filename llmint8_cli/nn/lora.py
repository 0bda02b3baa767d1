"""LoRA on an int8 base with peft: the Int8Linear frozen, the adapter beside it trained in 16/32-bit.

peft wraps only the layer types it knows; `lora_config(...)` is peft's LoraConfig with Int8Linear
registered (peft's custom-module API), so that

    config = llmint8_cli.nn.lora.lora_config(r=8, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(peft.prepare_model_for_kbit_training(llmint8_cli.load(OUT)), config)

trains as on a bitsandbytes 8-bit base: the gradient reaches the adapter through the int8 layers
(llmint8::int8_linear's backward, ops.py). Merging an adapter into int8 weights would round it
away, so it is refused: save the adapter (`model.save_pretrained`) and apply it at load.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from llmint8_cli.errors import InvalidArgumentError
from llmint8_cli.nn.linear import Int8Linear


def _peft_lora():
    try:
        from peft.tuners.lora import LoraConfig, LoraLayer
    except ImportError as exc:
        raise InvalidArgumentError(f"LoRA needs peft ({exc.name} is not installed): pip install peft") from None
    return LoraConfig, LoraLayer


@functools.cache
def lora_layer_class() -> type[nn.Module]:
    """peft's LoRA layer for an Int8Linear base (made on first use: peft is an optional dependency)."""
    _, LoraLayer = _peft_lora()

    class Int8LoraLinear(nn.Module, LoraLayer):
        """y = Int8Linear(x) + B A dropout(x) * scaling, per active adapter (peft's Linear8bitLt, without merging)."""

        adapter_layer_names = LoraLayer.adapter_layer_names

        def __init__(self, base_layer: Int8Linear, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs) -> None:
            super().__init__()
            with warnings.catch_warnings():  # peft warns of any layer type it does not know; this one it now does
                warnings.filterwarnings("ignore", message="Unsupported layer type")
                LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def resolve_lora_variant(self, *, config, **kwargs):
            if getattr(config, "use_dora", False) or getattr(config, "alora_invocation_tokens", None) is not None:
                raise InvalidArgumentError("DoRA and aLoRA are not offered on Int8Linear; plain LoRA trains on it")
            return None

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise InvalidArgumentError("merging a LoRA adapter into int8 weights would round it away; save the adapter and apply it when loading")

        def get_delta_weight(self, adapter) -> torch.Tensor:
            return self.lora_B[adapter].weight @ self.lora_A[adapter].weight * self.scaling[adapter]

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            self._check_forward_args(x, *args, **kwargs)
            result = self.base_layer(x)
            if self.disable_adapters:
                return result
            for active in self.active_adapters:
                if active not in self.lora_A.keys():
                    continue
                lora_a, lora_b = self.lora_A[active], self.lora_B[active]
                update = lora_b(lora_a(self.lora_dropout[active](x.to(lora_a.weight.dtype)))) * self.scaling[active]
                result = result + update.to(result.dtype)
            return result

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    return Int8LoraLinear


def lora_config(**options):
    """peft's LoraConfig(**options) that also wraps Int8Linear layers."""
    LoraConfig, _ = _peft_lora()
    config = LoraConfig(**options)
    config._register_custom_module({Int8Linear: lora_layer_class()})
    return config
