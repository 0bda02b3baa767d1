"""bitsandbytes 8-bit checkpoints, both ways: what transformers + bitsandbytes (and vLLM) load.

bitsandbytes stores per linear `weight` int8 [out, in], `SCB` fp32 [out] (the row absmax, so the
scale is SCB/127) and `weight_format` uint8 0, and no outlier columns: it dequantizes them from
the int8 rows at run time. Export therefore puts our exact 16-bit columns into the int8 rows: a
row keeps its int8 values and scale where its 16-bit columns fit under its absmax, and is
re-rounded where they do not. Import keeps bitsandbytes' int8 rows and scales as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmint8_cli.checkpoint import format as fmt
from llmint8_cli.checkpoint import manifest
from llmint8_cli.checkpoint.output import check_output, copy_side_files, writing
from llmint8_cli.checkpoint.sources import open_folder
from llmint8_cli.checkpoint.writer import Entry, Group, write_tensors
from llmint8_cli.core.methods import get_method
from llmint8_cli.errors import CheckpointError, ConversionError

QUANT_METHOD = "bitsandbytes"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def read_block(folder: Path) -> dict | None:
    """A bitsandbytes 8-bit folder's quantization_config, else None."""
    block = fmt.config_block(folder)
    return block if block is not None and block.get("quant_method") == QUANT_METHOD and block.get("load_in_8bit") else None


def is_bitsandbytes_8bit(path) -> bool:
    return Path(path).is_dir() and read_block(Path(path)) is not None


def merge_outlier_columns(q: torch.Tensor, scale: torch.Tensor, idx: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(int8 rows, row absmax SCB, rows re-rounded) with the exact 16-bit columns put into the rows."""
    absmax = scale * 127
    if idx.numel() == 0:
        return q, absmax, 0
    columns = columns.float()
    wide = columns.abs().amax(dim=1) > absmax
    merged = q.clone()
    merged[:, idx.long()] = torch.round(columns / scale[:, None]).clamp(-127, 127).to(torch.int8)
    if wide.any():  # a 16-bit column beyond the row's absmax: the whole row is rounded again
        rows = q[wide].float() * scale[wide, None]
        rows[:, idx.long()] = columns[wide]
        new_absmax = rows.abs().amax(dim=1)
        merged[wide] = torch.round(rows * (127 / new_absmax)[:, None]).clamp(-127, 127).to(torch.int8)
        absmax = absmax.clone()
        absmax[wide] = new_absmax
    return merged, absmax, int(wide.sum())


def skip_modules(config: dict, quantized: list[str], src: Path) -> list[str]:
    """bitsandbytes' llm_int8_skip_modules: every linear layer we kept 16-bit, the LM head included.

    transformers + bitsandbytes replace only modules whose type is exactly nn.Linear, or GPT-2's
    Conv1D (transformers.integrations.bitsandbytes.replace_with_bnb_linear); a quantized layer of
    another type (Falcon's FalconLinear) would be loaded as a 16-bit layer holding int8 values, so
    such a model is refused here.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmint8_cli.nn.convert import Conv1D

    plain = dict(config)
    plain.pop("quantization_config", None)
    model_config = AutoConfig.for_model(**plain)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config)
    modules = dict(model.named_modules())
    unconverted = [name for name in quantized if not (type(modules.get(name)) is torch.nn.Linear or isinstance(modules.get(name), Conv1D))]
    if unconverted:
        kind = f"a {type(modules[unconverted[0]]).__name__}" if unconverted[0] in modules else "one expert's slice of a 3-D tensor"
        raise CheckpointError(f"{src}: transformers + bitsandbytes would not quantize {unconverted[0]} ({kind}, not an nn.Linear) "
                              f"nor {len(unconverted) - 1} more layers like it: the export would load as a broken model, so it is refused")
    return [name for name, module in modules.items() if isinstance(module, (torch.nn.Linear, Conv1D)) and name not in set(quantized)]


def refuse_unloadable(config: dict, written: set[str], src: Path) -> None:
    """The model transformers + bitsandbytes build from the export's config (on meta, through
    transformers' own bitsandbytes quantizer) must find every weight it holds among the tensors
    the export writes: where it builds modules of its own (Llama-4's experts become one linear
    layer per expert), the folder would load with random weights, so it is refused. Without
    bitsandbytes the check cannot be made and the export is written."""
    import importlib.util

    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer

    if importlib.util.find_spec("bitsandbytes") is None:
        return
    plain = {key: value for key, value in config.items() if key != "quantization_config"}
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**plain))
    quantizer = AutoHfQuantizer.from_config(BitsAndBytesConfig.from_dict(config["quantization_config"]), pre_quantized=True)
    quantizer.preprocess_model(model=model, device_map={"": "cpu"}, dtype=torch.float16, checkpoint_files=None)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(key for key in model.state_dict() if key not in written and key not in tied and key.endswith((".weight", ".bias")))
    if missing:
        raise CheckpointError(f"{src}: transformers + bitsandbytes build {type(model).__name__} with {missing[0]} (and {len(missing) - 1} more tensors) that "
                              "this export does not hold (they would load as random weights), so it is refused")


def checked_against_bitsandbytes(ours: Path, theirs: Path, layers: list[str], exported: bool) -> dict:
    """The written folder checked against the one it came from (nn/check.py), the bitsandbytes one
    as transformers + bitsandbytes run it: `exported` (ours -> theirs) or imported (theirs -> ours).
    Both models are held whole, so where they would not fit in the memory free, or bitsandbytes is
    absent, the check is skipped and the JSON says why."""
    import importlib.util

    import psutil
    from transformers import AutoModelForCausalLM

    from llmint8_cli import models
    from llmint8_cli.checkpoint.load import load
    from llmint8_cli.nn.check import CHECK_TOKENS, check_conversion, originals_in
    from llmint8_cli.nn.probe import probe_ids

    if importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "bitsandbytes is not installed"}
    needed, free = 2 * sum(p.stat().st_size for p in theirs.glob("*.safetensors")), psutil.virtual_memory().available
    if needed > free:
        return {"skipped": f"the two int8 models need {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free"}
    llmint8_model = load(ours, verify_files=False)
    bitsandbytes_model = AutoModelForCausalLM.from_pretrained(theirs, device_map="cpu", trust_remote_code=models.remote_code_allowed()).eval()
    reference, converted = (llmint8_model, bitsandbytes_model) if exported else (bitsandbytes_model, llmint8_model)
    return {**check_conversion(converted, originals_in(reference, converted, layers), probe_ids(reference, CHECK_TOKENS)), "text": "token ids spread over the vocabulary"}


def write_folder(out: Path, force: bool, groups: list[Group], config: dict, src: Path, max_shard_bytes: int, check=None) -> dict | None:
    """OUT atomically: the tensors, config.json, the source's side files and a manifest; with
    `check(folder)`, what it returns, a ConversionError leaving nothing written."""
    with writing(out, force) as tmp:
        hashes = write_tensors(tmp, groups, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_side_files(src, tmp)
        try:
            checked = check(tmp) if check else None
        except ConversionError as exc:
            raise ConversionError(f"{out} not written: {exc}") from None
        manifest.write_manifest(tmp, hashes)
    return checked


def export(folder: str, dest: str, force: bool = False, max_shard_bytes: int = 2 << 30, verify: bool = True) -> dict:
    """An llmint8 folder as a transformers + bitsandbytes 8-bit folder; returns the JSON summary."""
    from transformers import BitsAndBytesConfig

    src = Path(folder)
    block = fmt.read_quantization_config(src)
    if block is None:
        raise CheckpointError(f"{src}: not an llmint8 checkpoint (no quantization_config with quant_method 'llmint8')")
    method = get_method(block["method"])
    if method.zeropoint:
        raise CheckpointError(f"{src}: method {method.name} has zero points; bitsandbytes 8-bit stores absmax rows only (export an absmax method such as llm.int8)")
    if method.smoothing:
        raise CheckpointError(f"{src}: method {method.name} stores W / m and multiplies X by m; bitsandbytes 8-bit has no such step (export llm.int8)")
    if method.rotation:
        raise CheckpointError(f"{src}: method {method.name} stores W in a rotated basis and rotates X; bitsandbytes 8-bit has no such step (export llm.int8)")
    if verify:
        manifest.verify(src)
    out = check_output(Path(dest).expanduser().absolute(), src, force)
    tensors = open_folder(src)
    quantized = set(block["quantized_modules"])
    groups, rewritten, columns = [], {"rows": 0, "layers": 0}, 0
    for key in tensors.keys():
        layer, _, leaf = key.rpartition(".")
        if layer not in quantized or leaf == "bias":
            groups.append(Group([Entry(key, tensors.dtype(key), tensors.shape(key))], lambda key=key: {key: tensors.get(key)}))
        elif leaf == "weight":
            out_f, in_f = tensors.shape(key)
            entries = [Entry(key, torch.int8, (out_f, in_f)), Entry(f"{layer}.SCB", torch.float32, (out_f,)), Entry(f"{layer}.weight_format", torch.uint8, ())]
            columns += tensors.shape(f"{layer}.outlier_idx")[0]

            def produce(layer=layer, key=key):
                q, scb, rows = merge_outlier_columns(
                    tensors.get(key), tensors.get(f"{layer}.weight_scale"), tensors.get(f"{layer}.outlier_idx"), tensors.get(f"{layer}.outlier_weight"),
                )
                rewritten["rows"] += rows
                rewritten["layers"] += rows > 0
                return {key: q, f"{layer}.SCB": scb, f"{layer}.weight_format": torch.zeros((), dtype=torch.uint8)}

            groups.append(Group(entries, produce))
    config = json.loads((src / "config.json").read_text())
    threshold = block["threshold"] if method.decomposition else 0.0
    config["quantization_config"] = BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_threshold=threshold, llm_int8_skip_modules=skip_modules(config, block["quantized_modules"], src),
    ).to_dict()
    refuse_unloadable(config, {entry.name for group in groups for entry in group.entries}, src)
    checked = write_folder(out, force, groups, config, src, max_shard_bytes, lambda tmp: checked_against_bitsandbytes(src, tmp, block["quantized_modules"], exported=True))
    notes = []
    if columns:
        notes.append(f"{columns} stored 16-bit outlier columns were put into the int8 rows (bitsandbytes keeps none); "
                     f"{rewritten['rows']} rows in {rewritten['layers']} layers were re-rounded because a 16-bit column exceeded the row's absmax")
    if not method.decomposition:
        notes.append(f"{method.name} has no decomposition: llm_int8_threshold 0.0 (bitsandbytes then runs every column in int8)")
    if method.name not in ("vectorwise", "llm.int8"):
        notes.append(f"bitsandbytes quantizes activations row-wise at run time, not as {method.name} does")
    return {
        "source": str(src), "output": str(out), "format": "bitsandbytes", "method": method.name, "llm_int8_threshold": threshold,
        "layers": len(quantized), "outlier_columns_merged": columns, "rows_rerounded": rewritten["rows"],
        "size_bytes": sum(p.stat().st_size for p in out.iterdir()), "check": checked, "notes": notes,
    }


def converted_method(block: dict) -> tuple[str, float]:
    """(llmint8 method, threshold) a bitsandbytes 8-bit folder converts to: its decomposition
    threshold if it has one (llm.int8), else vectorwise (stored with the paper's 6.0)."""
    threshold = float(block.get("llm_int8_threshold") or 0.0)
    return ("llm.int8", threshold) if threshold > 0 else ("vectorwise", 6.0)


def check_layer(src: Path, tensors, layer: str) -> None:
    """A bitsandbytes layer's tensors as bitsandbytes writes them, from the headers: int8 [out, in]
    rows, floating SCB [out] and a scalar weight_format; the values are checked as they are read."""
    weight, scb = f"{layer}.weight", f"{layer}.SCB"
    if weight not in tensors.keys() or tensors.dtype(weight) != torch.int8 or len(tensors.shape(weight)) != 2:
        raise CheckpointError(f"{src}: tensor {weight} is missing or not an int8 matrix")
    if not tensors.dtype(scb).is_floating_point or tuple(tensors.shape(scb)) != tensors.shape(weight)[:1]:
        raise CheckpointError(f"{src}: tensor {scb} is {str(tensors.dtype(scb)).removeprefix('torch.')} {list(tensors.shape(scb))}, "
                              f"bitsandbytes stores a float vector of one row maximum per output row ({tensors.shape(weight)[0]})")
    fmt_key = f"{layer}.weight_format"
    if fmt_key in tensors.keys() and (tensors.dtype(fmt_key).is_floating_point or torch.Size(tensors.shape(fmt_key)).numel() != 1):
        raise CheckpointError(f"{src}: tensor {fmt_key} is not an integer scalar")


def import_folder(folder: str, out: str, force: bool = False, max_shard_bytes: int = 2 << 30) -> dict:
    """A bitsandbytes 8-bit folder as an llmint8 folder: the int8 rows kept, scale = SCB / 127."""
    from llmint8_cli.checkpoint.quantize import to_sixteen_bit

    src = Path(folder)
    block = read_block(src)
    tensors = open_folder(src)
    layers = sorted(key.removesuffix(".SCB") for key in tensors.keys() if key.endswith(".SCB"))
    if not layers:
        raise CheckpointError(f"{src}: a bitsandbytes 8-bit config, but no <layer>.SCB tensors in its weights")
    for layer in layers:
        check_layer(src, tensors, layer)
    out_path = check_output(Path(out).expanduser().absolute(), src, force)
    stated = json.loads((src / "config.json").read_text()).get("dtype")
    dtype = torch.bfloat16 if stated == "bfloat16" else torch.float16
    name, threshold = converted_method(block)
    method = get_method(name)
    groups, clamped = [], []
    for key in tensors.keys():
        layer, _, leaf = key.rpartition(".")
        if layer in layers and leaf in ("SCB", "weight_format"):
            continue
        if layer in layers and leaf == "weight":
            out_f, in_f = tensors.shape(key)

            def produce(layer=layer, key=key, out_f=out_f):
                fmt_value = tensors.get(f"{layer}.weight_format") if f"{layer}.weight_format" in tensors.keys() else torch.zeros(())
                if int(fmt_value) != 0:
                    raise CheckpointError(f"{src}: {layer}.weight_format is {int(fmt_value)}; only row-major int8 weights (0) are supported")
                scb = tensors.get(f"{layer}.SCB").float()
                if not bool((torch.isfinite(scb) & (scb >= 0)).all()):
                    raise CheckpointError(f"{src}: tensor {layer}.SCB holds NaN, Inf or negative row maxima")
                return {
                    key: tensors.get(key), f"{layer}.weight_scale": scb / 127,
                    f"{layer}.outlier_idx": torch.zeros(0, dtype=torch.int32), f"{layer}.outlier_weight": torch.zeros(out_f, 0, dtype=dtype),
                }

            entries = [Entry(key, torch.int8, (out_f, in_f)), Entry(f"{layer}.weight_scale", torch.float32, (out_f,)),
                       Entry(f"{layer}.outlier_idx", torch.int32, (0,)), Entry(f"{layer}.outlier_weight", dtype, (out_f, 0))]
            groups.append(Group(entries, produce))
            continue
        kind = dtype if tensors.dtype(key).is_floating_point else tensors.dtype(key)
        groups.append(Group([Entry(key, kind, tensors.shape(key))], lambda key=key: {key: to_sixteen_bit(key, tensors.get(key), dtype, False, clamped)}))
    config = json.loads((src / "config.json").read_text())
    calibration = {"samples": 0, "note": "converted from a bitsandbytes 8-bit folder: int8 rows kept, no stored outlier columns (bitsandbytes keeps none)"}
    config["quantization_config"] = {
        **fmt.quantization_config(method.name, threshold, [], layers, dtype, calibration), "source": "",
    }
    config["dtype"] = str(dtype).removeprefix("torch.")
    checked = write_folder(out_path, force, groups, config, src, max_shard_bytes, lambda tmp: checked_against_bitsandbytes(tmp, src, layers, exported=False))
    return {
        "source": str(src), "output": str(out_path), "format": "llmint8", "from": "bitsandbytes", "method": method.name,
        "threshold": threshold, "dtype": str(dtype).removeprefix("torch."), "quantized_layers": len(layers),
        "size_bytes": sum(p.stat().st_size for p in out_path.iterdir()), "clamped_tensors": clamped, "check": checked,
        "notes": ["int8 rows and scales kept as bitsandbytes stored them (scale = SCB / 127); outlier columns are found at run time, as bitsandbytes does"],
    }
