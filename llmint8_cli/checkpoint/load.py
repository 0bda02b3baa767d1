"""llmint8_cli.load(OUT): a ready transformers model with Int8Linear layers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmint8_cli.checkpoint.format import read_quantization_config, stored_rotation_block, verify
from llmint8_cli.core.reference import ROTATION_BLOCK
from llmint8_cli.errors import CheckpointError
from llmint8_cli.nn.convert import quantizable_layers, replace_module
from llmint8_cli.nn.linear import Int8Linear


def shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / "model.safetensors"]


def outlier_counts(files: list[Path], names: list[str]) -> dict[str, int]:
    """Stored outlier columns per quantized layer, from the safetensors headers alone."""
    from safetensors import safe_open

    counts = {}
    for file in files:
        if file.suffix != ".safetensors":
            continue
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(".outlier_idx"):
                    counts[key.removesuffix(".outlier_idx")] = handle.get_slice(key).get_shape()[0]
    missing = [name for name in names if name not in counts]
    if missing:
        raise CheckpointError(f"{files[0].parent if files else '?'}: tensor {missing[0]}.outlier_idx missing from the checkpoint")
    return counts


def install_shells(model, block: dict, counts: dict[str, int], dtype: torch.dtype) -> None:
    """Replace the checkpoint's quantized layers of a (meta) model by empty Int8Linear shells."""
    modules = dict(quantizable_layers(model, block["skip_modules"]))
    for name in block["quantized_modules"]:
        if name not in modules:
            raise CheckpointError(f"quantized module {name} does not exist in the model built from config.json")
        module = modules[name]
        out_features, in_features = (module.out_features, module.in_features) if isinstance(module, torch.nn.Linear) else module.weight.shape[::-1]
        shell = Int8Linear(
            in_features, out_features, module.bias is not None, method=block["method"], threshold=block["threshold"],
            num_outliers=counts[name], rotation_block=stored_rotation_block(block) or ROTATION_BLOCK, dtype=dtype, device="meta",
        )
        replace_module(model, name, shell)


def build_empty(folder: Path, block: dict, dtype: torch.dtype):
    """The model skeleton on the meta device with Int8Linear shells where the checkpoint has them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    config.quantization_config = None
    del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    install_shells(model, block, outlier_counts(shard_files(folder), block["quantized_modules"]), dtype)
    model.tie_weights()  # ties exist before loading, so the checkpoint's single copy fills both
    return model


def load(path, device_map=None, dtype: torch.dtype | None = None, verify_files: bool = True, max_memory=None):
    """Load an llmint8 checkpoint folder; `device_map` ("auto", a dict, ...) goes through accelerate.

    `dtype` casts the 16-bit tensors (int8 and scales are never cast), e.g. fp32 for fast CPU runs.
    """
    from accelerate import dispatch_model, infer_auto_device_map, load_checkpoint_in_model

    from llmint8_cli.checkpoint.hf_quantizer import attach

    folder = Path(path)
    block = read_quantization_config(folder)
    if block is None:
        raise CheckpointError(f"{folder}: not an llmint8 checkpoint (no quantization_config with quant_method 'llmint8' in config.json)")
    if verify_files:
        verify(folder)
    stored = getattr(torch, block["dtype"])
    dtype = dtype or stored
    model = build_empty(folder, block, dtype)
    no_split = getattr(model, "_no_split_modules", None) or []
    if isinstance(device_map, str) and device_map != "cpu":
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    placement = device_map if isinstance(device_map, dict) else {"": device_map or "cpu"}
    index = folder / "model.safetensors.index.json"
    load_checkpoint_in_model(model, str(index if index.is_file() else folder / "model.safetensors"), device_map=placement, strict=False)
    model.tie_weights()
    for module in model.modules():  # 16-bit tensors follow dtype; int8 and fp32 scales never change
        if isinstance(module, Int8Linear):
            module.outlier_weight.data = module.outlier_weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if missing:
        raise CheckpointError(f"{folder}: tensors missing from the checkpoint: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if isinstance(device_map, dict) and len(set(device_map.values())) > 1:
        model = dispatch_model(model, device_map=device_map)
    attach(model, block)
    return model.eval()
