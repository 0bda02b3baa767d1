"""llmint8_cli.load(OUT): a ready transformers model with Int8Linear layers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmint8_cli.checkpoint.format import read_quantization_config, stored_rotation_block
from llmint8_cli.checkpoint.manifest import is_plain_name, verify
from llmint8_cli.checkpoint.sources import DTYPES, read_header
from llmint8_cli.core.reference import ROTATION_BLOCK
from llmint8_cli.errors import CheckpointError, one_line
from llmint8_cli.models import build_skeleton
from llmint8_cli.nn.convert import quantizable_layers, replace_module
from llmint8_cli.nn.linear import Int8Linear


def shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return [folder / "model.safetensors"]
    try:
        names = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{index}: not a valid safetensors index") from None
    if not all(is_plain_name(name) for name in names):
        raise CheckpointError(f"{index}: a shard name is not a file name inside the folder")
    return [folder / name for name in sorted(names)]


def stored_tensors(files: list[Path]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every stored tensor's (shape, dtype), from the safetensors headers alone (each checked against the format)."""
    stored = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: weight file missing")
        stored.update({key: (tuple(entry["shape"]), DTYPES[entry["dtype"]]) for key, (_, entry) in read_header(file).items()})
    return stored


def install_shells(model, block: dict, stored: dict[str, tuple[tuple[int, ...], torch.dtype]], dtype: torch.dtype, where) -> None:
    """Replace the checkpoint's quantized layers of a (meta) model by empty Int8Linear shells, then
    check every tensor the model will read against the stored shapes: a missing or misshapen one
    is refused here, naming it, before any data is read."""
    modules = dict(quantizable_layers(model, block["skip_modules"]))
    for name in block["quantized_modules"]:
        if name not in modules:
            raise CheckpointError(f"{where}: quantized module {name} does not exist in the model built from config.json")
        module = modules[name]
        out_features, in_features = (module.out_features, module.in_features) if isinstance(module, torch.nn.Linear) else module.weight.shape[::-1]
        idx_shape, _ = stored.get(f"{name}.outlier_idx", ((), None))
        if len(idx_shape) != 1:
            raise CheckpointError(f"{where}: tensor {name}.outlier_idx missing from the checkpoint or not a vector")
        shell = Int8Linear(
            in_features, out_features, module.bias is not None, method=block["method"], threshold=block["threshold"],
            num_outliers=idx_shape[0], rotation_block=stored_rotation_block(block) or ROTATION_BLOCK, dtype=dtype, device="meta",
        )
        replace_module(model, name, shell)
        for key, tensor in [*shell.named_buffers(), *shell.named_parameters()]:
            if f"{name}.{key}" not in stored:
                raise CheckpointError(f"{where}: tensor {name}.{key} missing from the checkpoint")
            if not tensor.is_floating_point() and stored[f"{name}.{key}"][1] != tensor.dtype:
                raise CheckpointError(f"{where}: tensor {name}.{key} is {stored[f'{name}.{key}'][1]}, the format stores {tensor.dtype}")
    for key, tensor in model.state_dict().items():
        if key in stored and stored[key][0] != tuple(tensor.shape):
            raise CheckpointError(f"{where}: tensor {key} has shape {list(stored[key][0])}, the model built from config.json needs {list(tensor.shape)}")


def check_loaded(model, where) -> None:
    """The loaded values every Int8Linear relies on, each within its domain (a folder loaded
    without verification, or written by other code, may hold anything)."""
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            problem = module.stored_value_problem()
            if problem:
                raise CheckpointError(f"{where}: tensor {name}.{problem}")


def build_empty(folder: Path, block: dict, dtype: torch.dtype):
    """The model skeleton on the meta device with Int8Linear shells where the checkpoint has them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # transformers raises many types for a bad config
        raise CheckpointError(f"{folder / 'config.json'}: unreadable config ({one_line(exc)})") from None
    config.quantization_config = None
    del config.quantization_config
    model = build_skeleton(lambda: AutoModelForCausalLM.from_config(config, dtype=dtype), folder / "config.json")
    install_shells(model, block, stored_tensors(shard_files(folder)), dtype, folder)
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
    try:
        load_checkpoint_in_model(model, str(index if index.is_file() else folder / "model.safetensors"), device_map=placement, strict=False)
    except (ValueError, RuntimeError, OSError) as exc:  # a tensor the header checks could not see wrong (its dtype)
        raise CheckpointError(f"{folder}: cannot load the weights ({one_line(exc)})") from None
    model.tie_weights()
    for module in model.modules():  # 16-bit tensors follow dtype; int8 and fp32 scales never change
        if isinstance(module, Int8Linear):
            module.outlier_weight.data = module.outlier_weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if missing:
        raise CheckpointError(f"{folder}: tensors missing from the checkpoint: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    check_loaded(model, folder)
    if isinstance(device_map, dict) and len(set(device_map.values())) > 1:
        model = dispatch_model(model, device_map=device_map)
    attach(model, block)
    return model.eval()
