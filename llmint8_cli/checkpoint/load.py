"""llmint8_cli.load(OUT): a ready transformers model with Int8Linear layers, and what the
registered transformers quantizer (hf_quantizer.py) checks while it builds one."""

from __future__ import annotations

from pathlib import Path

import torch

from llmint8_cli import models
from llmint8_cli.checkpoint.format import read_quantization_config, stored_rotation_block
from llmint8_cli.checkpoint.manifest import verify, verifying
from llmint8_cli.checkpoint.sources import DTYPES, read_header
from llmint8_cli.core.reference import ROTATION_BLOCK
from llmint8_cli.errors import CheckpointError, InvalidArgumentError, LLMInt8Error, one_line
from llmint8_cli.nn.convert import quantizable_layers, replace_module
from llmint8_cli.nn.linear import Int8Linear


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
    listed = set(block["quantized_modules"])
    stray = next((key for key, (_, stored_dtype) in stored.items() if key.rpartition(".")[2] in Int8Linear.STORED_DTYPES and not stored_dtype.is_floating_point
                  and key.rpartition(".")[0] not in listed), None)
    if stray is not None:
        raise CheckpointError(f"{where}: tensor {stray} ({stored[stray][1]}) belongs to a quantized layer that quantization_config does not list in quantized_modules")
    sixteen_bit = getattr(torch, block["dtype"])
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
            expected = Int8Linear.STORED_DTYPES.get(key, sixteen_bit)
            if stored[f"{name}.{key}"][1] != expected:
                raise CheckpointError(f"{where}: tensor {name}.{key} is {stored[f'{name}.{key}'][1]}, the format stores {expected}"
                                      f"{'' if key in Int8Linear.STORED_DTYPES else ' (the dtype quantization_config records)'}")
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # {alias: the tensor stored once}
    missing = [key for key, _ in model.named_parameters() if key not in stored and key not in tied]  # buffers: transformers may rebuild them
    if missing:
        raise CheckpointError(f"{where}: tensor {missing[0]} missing from the checkpoint")
    for key, tensor in model.state_dict().items():
        if key in stored and stored[key][0] != tuple(tensor.shape):
            raise CheckpointError(f"{where}: tensor {key} has shape {list(stored[key][0])}, the model built from config.json needs {list(tensor.shape)}")


def check_loaded(model, where) -> None:
    """The loaded values every Int8Linear relies on, each within its domain (a folder loaded
    without verification, or written by other code, may hold anything)."""
    from accelerate.utils import align_module_device

    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            with align_module_device(module):  # an offloaded layer's values, read back from the CPU or the disk for the check
                problem = module.stored_value_problem()
            if problem:
                raise CheckpointError(f"{where}: tensor {name}.{problem}")


def placed_device_map(folder: Path, block: dict, dtype: torch.dtype, placement) -> dict:
    """The placement's map for this folder, computed on the model transformers will build (int8
    shells on meta, their real sizes) before a weight is read."""
    from llmint8_cli.checkpoint.quantize import empty_model

    config = models.load_config(models.ModelSource("folder", str(folder)))
    skeleton = empty_model(config, dtype, folder / "config.json")
    files = sorted(folder.glob("*.safetensors"))
    install_shells(skeleton, block, stored_tensors(files), dtype, folder)
    return placement.device_map(skeleton, dtype, str(folder), buffers_are_weights=True)


def load(path, device_map=None, dtype: torch.dtype | None = None, verify_files: bool = True, max_memory=None, offload_folder=None):
    """Load an llmint8 checkpoint folder: transformers' `from_pretrained` through the registered
    quantizer, so that `load` and `from_pretrained` are one loader and give the same model bit for
    bit (non-persistent buffers such as rotary tables included, made as transformers makes them).

    `dtype` casts the 16-bit tensors (int8 and scales are never cast), e.g. fp32 for fast CPU runs;
    `device_map` ("auto", "balanced", "balanced_low_0", "sequential" or a dict of module ->
    device; the CLI passes its own placement.Placement), `max_memory` and `offload_folder` are
    transformers' (accelerate's): the map is computed before any weight is read, a model that does
    not fit is refused then, and `max_memory` counts the weights as they are held, in `dtype`.
    """
    from llmint8_cli.placement import Placement

    from transformers import AutoModelForCausalLM

    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise InvalidArgumentError("max_memory and offload_folder place a model with device_map: give one too (device_map=\"auto\")")
    folder = Path(path)
    block = read_quantization_config(folder)
    if block is None:
        raise CheckpointError(f"{folder}: not an llmint8 checkpoint (no quantization_config with quant_method 'llmint8' in config.json)")
    dtype = dtype or getattr(torch, block["dtype"])
    placed = {}
    if device_map is not None:  # from the headers (our parser, checked shapes): a model that does not fit is refused before a weight is read
        placement = device_map if isinstance(device_map, Placement) else Placement.of(device_map, max_memory, offload_folder)  # the CLI's own, or transformers' arguments
        device_map = placed_device_map(folder, block, dtype, placement)
        # Int8Linear's int8 rows are buffers: offloaded with the parameters, or they would all sit on the main device
        placed = {"device_map": device_map, "offload_folder": placement.offload_folder, "offload_buffers": bool({"cpu", "disk"} & set(device_map.values()))}
    if verify_files:  # before transformers reads the config, the index or a shard
        verify(folder)
    with verifying(False):  # checked already
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=models.remote_code_allowed(), **placed)
        except LLMInt8Error:
            raise
        except Exception as exc:  # transformers raises many types for a bad folder
            if not models.remote_code_allowed() and models.needs_remote_code(exc):
                raise models.remote_code_error(models.ModelSource("folder", str(folder))) from None
            raise CheckpointError(f"{folder}: cannot load ({one_line(exc)})") from None
    if placed:
        model.hf_device_map = placed["device_map"]  # transformers leaves it unset where the map is one device
    return model.eval()
