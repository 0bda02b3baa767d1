"""The llmint8 checkpoint format (documented in FORMAT.md) and loading it back.

OUT/
  config.json                 the source config + "quantization_config" (quant_method "llmint8")
  generation_config.json, tokenizer files (copied from the source)
  model.safetensors           or model-0000i-of-0000n.safetensors + model.safetensors.index.json
  llmint8_manifest.json       sha256 and size of every other file
Per quantized linear <name>: <name>.weight int8 [out, in], <name>.weight_scale fp32 [out],
<name>.weight_zero int32 [out] (zeropoint methods), <name>.outlier_idx int32 [k],
<name>.outlier_weight 16-bit [out, k], <name>.input_smooth fp32 [in] (smoothing methods, format
version 2), <name>.bias 16-bit [out] where the layer has one. Rotation methods store the int8
weight in the block-Hadamard basis of core/reference.py (format version 3 for 64-wide blocks, 4 with
`rotation.block` for any other width).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmint8_cli.core.methods import check_rotation_block, check_threshold, get_method
from llmint8_cli.core.reference import FIRST_ROTATION_BLOCK, ROTATION_BLOCK
from llmint8_cli.errors import CheckpointError, InvalidArgumentError

FORMAT_VERSION = 1  # the paper's methods
SMOOTHING_FORMAT_VERSION = 2  # adds <name>.input_smooth (llm.int8-smooth); older readers refuse it
ROTATION_FORMAT_VERSION = 3  # int8 weights in a rotated basis (llm.int8-rotate), 64-wide blocks; older readers refuse it
ROTATION_BLOCK_FORMAT_VERSION = 4  # a rotation block other than 64 (`rotation.block`, default 256); version-3 readers would assume 64
VERSIONS = (FORMAT_VERSION, SMOOTHING_FORMAT_VERSION, ROTATION_FORMAT_VERSION, ROTATION_BLOCK_FORMAT_VERSION)
QUANT_METHOD = "llmint8"
STORED_DTYPES = ("float16", "bfloat16", "float32")  # of the 16-bit tensors (float32 after save_pretrained of an fp32-loaded model)


def format_version(method: str, rotation_block: int = ROTATION_BLOCK) -> int:
    """The oldest format that can hold a method's checkpoint."""
    spec = get_method(method)
    if spec.rotation:
        return ROTATION_FORMAT_VERSION if rotation_block == FIRST_ROTATION_BLOCK else ROTATION_BLOCK_FORMAT_VERSION
    return SMOOTHING_FORMAT_VERSION if spec.smoothing else FORMAT_VERSION


def stored_rotation_block(block: dict) -> int:
    """The Hadamard block width of a rotation method's checkpoint (version 3 wrote no field: 64); 0 for other methods."""
    if not get_method(block["method"]).rotation:
        return 0
    rotation = block.get("rotation", {})
    if not isinstance(rotation, dict):
        raise InvalidArgumentError("rotation is not an object")
    return check_rotation_block(rotation.get("block", FIRST_ROTATION_BLOCK))


def quantization_config(method: str, threshold: float, skip: list[str], quantized: list[str], dtype: torch.dtype, calibration: dict,
                        rotation_block: int = ROTATION_BLOCK) -> dict:
    return {
        "quant_method": QUANT_METHOD,
        "format_version": format_version(method, rotation_block),
        "method": method,
        "threshold": threshold,
        "skip_modules": skip,
        "quantized_modules": quantized,
        "dtype": str(dtype).removeprefix("torch."),
        "calibration": calibration,
    }


def config_block(folder) -> dict | None:
    """The quantization_config of a folder's config.json, whatever its method; None if it has none."""
    try:
        block = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return block if isinstance(block, dict) else None


LLMINT8_TENSOR_SUFFIXES = (".weight_scale", ".outlier_idx")  # every quantized layer stores both; no other format does


def holds_llmint8_tensors(keys) -> bool:
    """Whether these tensor names are llmint8's quantized layers, whatever the config beside them says."""
    return all(any(key.endswith(suffix) for key in keys) for suffix in LLMINT8_TENSOR_SUFFIXES)


def refuse_lost_block(folder, block: dict | None, keys: list[str] | None = None) -> None:
    """An llmint8 folder is recognised by its tensors (`keys`, else read from its headers; a file
    that cannot be read is left to its loader): one whose config lost its block (or had it
    renamed) would load as a 16-bit model holding int8 values, silently wrong."""
    from llmint8_cli.checkpoint.sources import safetensors_keys
    from llmint8_cli.errors import LLMInt8Error

    if keys is None:
        try:
            keys = safetensors_keys(folder)
        except (LLMInt8Error, OSError):
            return
    if holds_llmint8_tensors(keys):
        found = "none" if block is None else f"quant_method {block.get('quant_method')!r}"
        raise CheckpointError(f"{Path(folder) / 'config.json'}: the folder holds llmint8 tensors (int8 weights, weight_scale, outlier_idx) but its config has "
                              f"no quantization_config with quant_method {QUANT_METHOD!r} ({found}); the config was edited or replaced: restore it")


def read_quantization_config(folder: Path) -> dict | None:
    """The quantization_config block of an llmint8 folder, or None for any other folder (a folder
    with llmint8 tensors and another config is refused: refuse_lost_block)."""
    block = config_block(folder)
    if block is not None and block.get("quant_method") == QUANT_METHOD:
        check_block(Path(folder) / "config.json", block)
        return block
    refuse_lost_block(folder, block)
    return None


def check_block(config_path: Path, block: dict) -> None:
    """The fields a loader reads, checked here so that a bad one is reported with the file it came from."""
    if block.get("format_version") not in VERSIONS:
        raise CheckpointError(f"{config_path}: llmint8 format version {block.get('format_version')!r} is not supported (expected one of {', '.join(map(str, VERSIONS))})")
    try:
        method = block.get("method")
        if not isinstance(method, str) or not get_method(method).quantized:
            raise InvalidArgumentError(f"method {method!r} is not one of the 8-bit methods")
        check_threshold(block.get("threshold"))
        needed = format_version(method, stored_rotation_block(block))
        if needed != FORMAT_VERSION and block.get("format_version") != needed:
            raise InvalidArgumentError(f"method {method!r} needs format_version {needed}")
        for key in ("quantized_modules", "skip_modules"):
            if not (isinstance(block.get(key), list) and all(isinstance(name, str) for name in block[key])):
                raise InvalidArgumentError(f"{key} is not a list of module names")
        if block.get("dtype") not in STORED_DTYPES:
            raise InvalidArgumentError(f"dtype {block.get('dtype')!r} is not one of {', '.join(STORED_DTYPES)}")
        for key in ("calibration", "smoothing"):
            if not isinstance(block.get(key, {}), dict):
                raise InvalidArgumentError(f"{key} is not an object")
        kept = block.get("kept_16bit", {})
        if not (isinstance(kept, dict) and all(isinstance(name, str) and isinstance(why, str) for name, why in kept.items())):
            raise InvalidArgumentError("kept_16bit is not an object of layer name -> reason")
    except InvalidArgumentError as exc:
        raise CheckpointError(f"{config_path}: quantization_config: {exc}") from None


def is_llmint8_checkpoint(folder) -> bool:
    return Path(folder).is_dir() and read_quantization_config(folder) is not None
