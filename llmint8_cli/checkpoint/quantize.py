"""`llmint8 quantize SRC OUT`: stream a 16-bit checkpoint into the llmint8 format.

Weights go tensor by tensor from the source shards to the output shards (memory ~ the largest
tensor). Calibration runs the model once over a few windows of text to find each layer's outlier
columns, streaming one decoder layer at a time from the source. OUT is written to a temporary
folder beside it and renamed into place at the very end.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from llmint8_cli import activations, data, models
from llmint8_cli.backends import backend_for
from llmint8_cli.checkpoint import bitsandbytes
from llmint8_cli.checkpoint import format as fmt
from llmint8_cli.checkpoint.load import install_shells, stored_tensors
from llmint8_cli.checkpoint.manifest import write_manifest
from llmint8_cli.checkpoint.output import check_free_space, check_output, copy_side_files, writing
from llmint8_cli.checkpoint.sources import ModelKeyedSource, ModelSource, TensorSource, open_folder
from llmint8_cli.checkpoint.writer import Entry, Group, write_tensors
from llmint8_cli.core import reference
from llmint8_cli.core.methods import DEFAULT_METHOD, DEFAULT_SMOOTH_ALPHA, check_alpha, check_rotation_block, get_method
from llmint8_cli.errors import ConversionError, DataError, InvalidArgumentError, InvalidWeightError, ModelLoadError
from llmint8_cli.evaluation.perplexity import make_windows, tokenize
from llmint8_cli.nn.convert import Conv1D, parameter_report, quantizable_layers
from llmint8_cli.nn.experts import unfuse_experts
from llmint8_cli.nn.check import CHECK_TOKENS, check_conversion, originals_in
from llmint8_cli.nn.probe import probe_ids, watching

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # fp32: twice the size, for a copy that must compute as an fp32 source does


@dataclass
class QuantizeOptions:
    method: str = DEFAULT_METHOD
    threshold: float | None = None  # None: the method's own (Method.default_threshold)
    dtype: str = "auto"  # fp16 | bf16 | fp32 | auto (the source's 16-bit dtype, fp32 sources -> fp16)
    skip: list[str] = field(default_factory=list)
    calib_samples: int = 32
    calib_seq_len: int = 512
    calib_dataset: str = "wikitext2-train"
    calib_batch_size: int = 4
    smooth_alpha: float = DEFAULT_SMOOTH_ALPHA  # smoothing methods: how much of X's range moves into W
    outlier_ratio: float | None = None  # also store systematic features this many times their layers' typical column (None: the method's own; 0: off)
    rotation_block: int = reference.ROTATION_BLOCK  # rotation methods: the Hadamard block width (a power of 4)
    max_shard_bytes: int = 2 << 30
    data_dir: str | None = None
    clamp_overflow: bool = False  # clamp finite values beyond the 16-bit range instead of refusing
    given: frozenset[str] = frozenset()  # the options a user set explicitly (cli.common.given_options)


CHOSEN_BY_SOURCE = ("method", "threshold", "calib_samples", "calib_seq_len", "calib_dataset", "smooth_alpha", "rotation_block", "skip", "dtype", "clamp_overflow",
                    "outlier_ratio")


def refuse_given(given: frozenset[str], fixed: tuple[str, ...], what: str, instead: str) -> None:
    """One line naming the first option a user set that `what` leaves no room for."""
    refused = [f"--{name.replace('_', '-')}" for name in fixed if name in given]
    if refused:
        raise InvalidArgumentError(f"{what}: {', '.join(refused)} cannot apply; {instead}")


def return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the OS at once.

    By default glibc raises its mmap threshold after large blocks are freed, so later tensors of
    that size come from the heap and stay resident: streaming layer after layer would then grow
    the process by GBs. A fixed 4 MiB threshold keeps every tensor-sized block mmapped.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def download(source: models.ModelSource) -> models.ModelSource:
    """Fetch a Hub repo's weights, config and tokenizer files (the real huggingface_hub path)."""
    from huggingface_hub import snapshot_download

    models.require_hub(source)
    try:
        folder = snapshot_download(source.location, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"])
    except Exception as exc:
        raise models._hub_error(source, exc) from None
    return models.resolve(folder)


def empty_model(config, dtype: torch.dtype, config_path):
    from transformers import AutoModelForCausalLM

    own_class = models.remote_code_allowed() and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if type(config) not in AutoModelForCausalLM._model_mapping and not own_class:
        raise ModelLoadError(f"unsupported architecture {getattr(config, 'model_type', '?')!r}: transformers has no causal LM for it")
    model = models.build_skeleton(lambda: models.causal_lm_from_config(config, dtype), config_path)
    unfuse_experts(model)  # one linear layer per expert, as the llmint8 format stores them
    return model


def target_dtype(option: str, source_dtype: torch.dtype) -> torch.dtype:
    if option == "auto":
        return source_dtype if source_dtype in (torch.float16, torch.bfloat16) else torch.float16
    if option not in DTYPES:
        raise InvalidArgumentError(f"--dtype must be fp16, bf16, fp32 or auto, got {option!r}")
    return DTYPES[option]


def key_renamer(model: torch.nn.Module):
    """(rename, converters): rename(source key) -> (model state-dict name, the source pattern of the
    transformers converter that fuses it with others, or None), as transformers itself renames
    checkpoint keys on load (its conversion mapping: GPT-NeoX's `embed_out` is `lm_head`,
    Mixtral's `block_sparse_moe` is `mlp`, ...), base-model prefix added or dropped as needed."""
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "")
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: prefixes only
        def by_prefix(key: str) -> tuple[str, None]:
            return next((c for c in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")) if c in state), key), None

        return by_prefix, []
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return (lambda key: rename_source_key(key, renamings, converters, prefix, state)), converters


EXPERT_MERGES = {("MergeModulelist",), ("MergeModulelist", "Concatenate")}  # stack experts [, join gate and up rows]


def expert_part(key: str, fused: str, pattern: str, converters) -> tuple[str, int]:
    """(the name of the expert's own linear weight in LinearExperts, the part's place in it) of a
    source tensor that transformers merges into the 3-D `fused` tensor of all experts."""
    converter = next(c for c in converters if pattern in c.source_patterns)
    operations = tuple(type(op).__name__ for op in converter.operations)
    found = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
    if operations not in EXPERT_MERGES or found is None:
        raise ModelLoadError(f"tensor {key}: transformers converts it into {fused} by {', '.join(operations)}, which quantize does not reproduce")
    return f"{fused}.{found.group(1)}.weight", converter.source_patterns.index(pattern)


def match_keys(model: torch.nn.Module, tensors: TensorSource) -> ModelKeyedSource:
    """The source's tensors under the model's own names, renamed as transformers renames them (an
    expert's gate and up rows joined into its own linear layer); one name per tied tensor."""
    expected = model.state_dict()
    rename, converters = key_renamer(model)
    parts: dict[str, dict[int, str]] = {}
    slices: dict[str, tuple[int, bool]] = {}
    for key in tensors.keys():
        name, fused_by = rename(key)
        place = 0
        if fused_by is not None:
            name, place = expert_part(key, name, fused_by, converters)
        if name in expected:
            parts.setdefault(name, {})[place] = key
            continue
        # every expert of a block in one stored tensor (GraniteMoE's input_linear, gpt-oss's gate_up_proj [E, in, out] and gate_up_proj_bias [E, out])
        stem, leaf = (name.removesuffix("_bias"), "bias") if name.endswith("_bias") else (name, "weight")
        if f"{stem}.0.{leaf}" in expected and len(tensors.shape(key)) == (3 if leaf == "weight" else 2):
            transposed = leaf == "weight" and getattr(model.get_submodule(stem.rpartition(".")[0]), "transposed", False)
            for expert in range(tensors.shape(key)[0]):
                parts[f"{stem}.{expert}.{leaf}"], slices[f"{stem}.{expert}.{leaf}"] = {0: key}, (expert, transposed)
    source = ModelKeyedSource(tensors, {name: [keys[i] for i in sorted(keys)] for name, keys in parts.items()}, slices)
    for name in source.keys():
        if tuple(source.shape(name)) != tuple(expected[name].shape):
            raise ModelLoadError(f"tensor {source.described(name)} has shape {list(source.shape(name))}, but the model config.json describes needs {list(expected[name].shape)}")
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    for group in aliases.values():
        present = [name for name in group if name in source.parts]
        if not present:
            raise ModelLoadError(f"the source has no tensor for {group[0]}, which {type(model).__name__} ({getattr(model.config, 'model_type', '?')}) "
                                 "needs, under its name or any name transformers renames to it")
        for alias in present[1:]:  # tied weights (embeddings and LM head) are written and counted once
            del source.parts[alias]
    return source


def source_dtype(tensors: TensorSource, config) -> torch.dtype:
    stated = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stated, torch.dtype):
        return stated
    if isinstance(stated, str) and hasattr(torch, stated):
        return getattr(torch, stated)
    floating = [tensors.dtype(k) for k in tensors.keys() if tensors.dtype(k).is_floating_point]
    return floating[0] if floating else torch.float16


def calibration_batches(tokenizer, options: QuantizeOptions) -> tuple[list[torch.Tensor], dict]:
    text = data.calibration_text(options.calib_dataset, options.data_dir)
    needed = options.calib_samples * options.calib_seq_len
    chars = 16 * needed  # tokenize only what the samples need: a token is rarely 16 characters
    ids, bos_id = tokenize(tokenizer, text.text[:chars], "window")
    if len(ids) < needed:
        ids, bos_id = tokenize(tokenizer, text.text, "window")
    windows = make_windows(ids, options.calib_seq_len, bos_id=bos_id, source=f"calibration text {text.source}")
    if len(windows.input_ids) < options.calib_samples and "calib_samples" in options.given:  # the default takes what there is
        raise DataError(f"--calib-samples {options.calib_samples}: the calibration text {text.source} holds {len(windows.input_ids)} windows of "
                        f"{options.calib_seq_len} tokens; ask for at most that many, or pass a longer --calib-dataset")
    samples = windows.input_ids[: options.calib_samples]
    batches = list(samples.split(options.calib_batch_size))
    info = {"dataset": text.name, "source": text.source, "samples": len(samples), "seq_len": options.calib_seq_len}
    if text.sample:
        info["note"] = text.note
    return batches, info


def calibrate(model, tensors: TensorSource | None, layer_names: list[str], tokenizer, options: QuantizeOptions, progress=None) -> tuple[activations.ActivationStats, dict]:
    """Per layer, each input column's max |x| (hence its outlier columns) over the calibration
    windows; with `tensors` (keyed by the model's names) the model is a skeleton and its decoder
    layers are streamed from them, one in memory at a time."""
    batches, info = calibration_batches(tokenizer, options)
    windows = sum(len(batch) for batch in batches)
    on_batch = (lambda done: progress("calibrate", done, windows)) if progress else None
    threshold = get_method(options.method).threshold_or_default(options.threshold)
    return forward_pass(model, tensors, batches, layer_names, threshold, on_batch), info


def forward_pass(model, tensors: TensorSource | None, batches: list[torch.Tensor], layer_names: list[str], threshold: float, on_batch=None) -> activations.ActivationStats:
    """The model's base run over `batches`, the inputs of `layer_names` observed; with `tensors` the
    model is a skeleton whose decoder layers are streamed in from them, one at a time."""
    streamer = None
    if tensors is not None:
        from accelerate.utils import set_module_tensor_to_device

        fetch = lambda name: tensors.get(name).float()  # noqa: E731
        streamer = activations.LayerStreamer(model, fetch)
        streamed = streamer.layer_parameter_names()
        head = model.get_output_embeddings()
        unused = {id(p) for p in head.parameters()} - {id(p) for p in model.get_input_embeddings().parameters()} if head is not None else set()
        for name, param in list(model.named_parameters()):  # the base model's own weights; no LM head
            if name not in streamed and name in tensors.parts and id(param) not in unused:
                set_module_tensor_to_device(model, name, "cpu", value=fetch(name))
    return activations.collect(model, batches, layer_names, threshold, streamer, on_batch)


def calibrated_columns(stats: activations.ActivationStats, threshold: float, ratio: float) -> tuple[dict[str, torch.Tensor], dict]:
    """The columns a calibration stores at a threshold and outlier ratio, and what its calibration
    block records of the ratio: the ratio and how many columns it added beyond the threshold."""
    columns = stats.outlier_columns(threshold, ratio)
    if ratio <= 0:
        return columns, {}
    added = sum(int(v.numel()) for v in columns.values()) - sum(int(v.numel()) for v in stats.outlier_columns(threshold).values())
    return columns, {"outlier_ratio": ratio, "systematic_columns": added}


def check_ids(model, tokenizer, options: QuantizeOptions) -> tuple[torch.Tensor, str]:
    """(the token ids [1, CHECK_TOKENS] a converted model is checked on, what they are): the
    calibration text's first tokens where there is a calibration (`tokenizer`), else ids spread
    over the vocabulary (the check's faults are in the code path, not in what the text says)."""
    if tokenizer is None:
        return probe_ids(model, CHECK_TOKENS), "token ids spread over the vocabulary"
    batches, _ = calibration_batches(tokenizer, replace(options, calib_samples=1, calib_seq_len=CHECK_TOKENS, given=frozenset()))
    return batches[0][:1], "calibration text"


def check_written(folder: Path, config, block: dict, model, tensors: TensorSource | None, ids: torch.Tensor) -> dict:
    """The model written in `folder` checked against its 16-bit `model` (nn/check.py), both streamed
    a decoder block at a time: the written tensors from the folder, and the source's from `tensors`
    where `model` is a skeleton (None: `model` is in memory)."""
    converted = empty_model(config, torch.float32, folder / "config.json")
    install_shells(converted, block, stored_tensors(sorted(folder.glob("*.safetensors"))), torch.float32, folder)
    written = open_folder(folder)
    names = set(written.keys())

    def fetch_written(name: str) -> torch.Tensor | None:
        if name not in names:
            return None
        tensor = written.get(name)
        return tensor.float() if tensor.is_floating_point() else tensor

    fetch_source = None if tensors is None else (lambda name: tensors.get(name).float() if name in tensors.parts else None)
    return check_conversion(converted, originals_in(model, converted, block["quantized_modules"]), ids, fetch_written, fetch_source)


def all_finite(tensor: torch.Tensor) -> bool:
    """Checked in chunks, so that no tensor-sized mask is allocated."""
    return all(bool(torch.isfinite(part).all()) for part in tensor.reshape(-1).split(1 << 22))


def to_sixteen_bit(key: str, tensor: torch.Tensor, dtype: torch.dtype, clamp: bool, clamped: list[str]) -> torch.Tensor:
    """A floating tensor in the checkpoint's 16-bit dtype; a finite value beyond that range is an error.

    With `clamp` such values are clamped to the largest finite value instead and `key` is added to
    `clamped`, so that the summary can say so: a silent inf would turn every later result into NaN.
    """
    if not tensor.is_floating_point():
        return tensor
    if not all_finite(tensor):
        raise InvalidWeightError(f"{key}: holds NaN or Inf values")
    converted = tensor.to(dtype)
    if converted.dtype == tensor.dtype or all_finite(converted):
        return converted
    limit = torch.finfo(dtype).max
    if not clamp:
        largest = float(tensor.abs().max())
        raise InvalidWeightError(
            f"{key}: finite values up to {largest:.4g} overflow {str(dtype).removeprefix('torch.')} (largest {limit:.6g}); "
            "use --dtype bf16, or --clamp-overflow to clamp them"
        )
    clamped.append(key)
    return tensor.clamp(-limit, limit).to(dtype)


def quantized_group(name: str, module, tensors: ModelKeyedSource, method, dtype, outlier_idx, clamp: bool, clamped: list[str],
                    input_max: torch.Tensor | None = None, alpha: float = DEFAULT_SMOOTH_ALPHA, rotation_block: int = reference.ROTATION_BLOCK) -> Group:
    transposed = isinstance(module, Conv1D)
    key = f"{name}.weight"
    shape = tensors.shape(key)
    out_f, in_f = shape[::-1] if transposed else shape
    k = 0 if outlier_idx is None or not method.decomposition else int(outlier_idx.numel())
    entries = [Entry(f"{name}.weight", torch.int8, (out_f, in_f)), Entry(f"{name}.weight_scale", torch.float32, (out_f,))]
    if method.zeropoint:
        entries.append(Entry(f"{name}.weight_zero", torch.int32, (out_f,)))
    entries += [Entry(f"{name}.outlier_idx", torch.int32, (k,)), Entry(f"{name}.outlier_weight", dtype, (out_f, k))]
    if method.smoothing:
        entries.append(Entry(f"{name}.input_smooth", torch.float32, (in_f,)))

    def produce() -> dict[str, torch.Tensor]:
        weight = to_sixteen_bit(tensors.described(key), tensors.get(key), dtype, clamp, clamped)
        weight = weight.t() if transposed else weight
        try:
            smooth = None
            if method.smoothing:
                stored = reference.stored_outlier_index(weight, method, outlier_idx)
                smooth = reference.smoothing_factors(input_max, weight, alpha, stored)
            qw = backend_for(weight.device).quantize_weight(weight, method, outlier_idx, smooth, rotation_block)
        except InvalidWeightError as exc:
            raise InvalidWeightError(f"{tensors.described(key)}: {exc}") from None
        out = {f"{name}.weight": qw.int8.q, f"{name}.weight_scale": qw.int8.scale, f"{name}.outlier_idx": qw.outlier_idx.to(torch.int32), f"{name}.outlier_weight": qw.outlier_weight}
        if method.zeropoint:
            out[f"{name}.weight_zero"] = qw.int8.zero
        if method.smoothing:
            out[f"{name}.input_smooth"] = qw.smooth
        return out

    return Group(entries, produce)


def plain_group(name: str, tensors: ModelKeyedSource, dtype: torch.dtype, clamp: bool, clamped: list[str]) -> Group:
    out_dtype = dtype if tensors.dtype(name).is_floating_point else tensors.dtype(name)

    def produce() -> dict[str, torch.Tensor]:
        return {name: to_sixteen_bit(tensors.described(name), tensors.get(name), dtype, clamp, clamped)}

    return Group([Entry(name, out_dtype, tensors.shape(name))], produce)


def side_files(source: models.ModelSource, tmp: Path, model_config, tokenizer) -> None:
    if source.kind == "folder":
        copy_side_files(Path(source.location), tmp)
    else:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        generation = getattr(model_config, "_generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)


def output_sizes(layers: dict, tensors: ModelKeyedSource) -> tuple[int, int, int]:
    """(expected output bytes, the same model in 16-bit, the source's bytes), from shapes alone."""
    expected = fp16_bytes = source_bytes = 0
    for name in tensors.keys():
        numel = torch.Size(tensors.shape(name)).numel()
        quantized = name.endswith(".weight") and name.removesuffix(".weight") in layers
        expected += numel if quantized else numel * 2
        fp16_bytes += numel * 2
        source_bytes += numel * tensors.dtype(name).itemsize
    return expected, fp16_bytes, source_bytes


def quantize_checkpoint(src: str, out: str | os.PathLike, options: QuantizeOptions, force: bool = False, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Quantize SRC into OUT; returns the JSON summary.

    `progress(stage, done, total)` reports "calibrate" in windows and "write" in bytes.
    """
    started = time.time()
    return_freed_memory()
    method = get_method(options.method)
    if not method.quantized:
        raise InvalidArgumentError("method 'fp16' quantizes nothing; choose one of the 8-bit methods")
    options = replace(options, threshold=method.threshold_or_default(options.threshold), outlier_ratio=method.outlier_ratio_or_default(options.outlier_ratio))
    check_alpha(options.smooth_alpha)
    check_rotation_block(options.rotation_block)
    if method.smoothing and options.calib_samples <= 0:
        raise InvalidArgumentError(f"method {method.name!r} is calibrated: --calib-samples must be at least 1")
    source = models.resolve(src)
    if source.kind == "folder" and bitsandbytes.is_bitsandbytes_8bit(source.location):
        refuse_given(options.given, CHOSEN_BY_SOURCE, f"{src} is a bitsandbytes 8-bit folder, converted with its int8 rows kept as they are",
                     "quantize its 16-bit source to choose these")
        return bitsandbytes.import_folder(source.location, out, force, options.max_shard_bytes)
    out = check_output(Path(out).expanduser().absolute(), None if source.kind == "hub" else Path(source.location), force)
    if source.kind == "hub":
        source = download(source)

    tokenizer = None
    if source.kind == "gguf":
        model = models.load_model(source)
        unfuse_experts(model)
        tokenizer = models.load_tokenizer(source)
        raw: TensorSource = ModelSource(model)
        config, streaming = model.config, False
        src_dtype = torch.float32
    else:
        config = models.load_config(source)
        raw = open_folder(Path(source.location))
        models.check_layer_count(config, raw.keys(), Path(source.location) / "config.json")
        src_dtype = source_dtype(raw, config)
        model = empty_model(config, torch.float32, Path(source.location) / "config.json")
        streaming = True
    dtype = target_dtype(options.dtype, src_dtype)
    tensors = match_keys(model, raw)
    layers = dict(quantizable_layers(model, options.skip))
    if not layers:
        raise InvalidArgumentError("no linear layer left to quantize (check --skip)")
    expected_bytes, fp16_bytes, source_bytes = output_sizes(layers, tensors)

    with writing(out, force) as tmp:  # made before calibration: an unwritable OUT fails now, not minutes later
        check_free_space(tmp, expected_bytes)
        outliers, input_max, calibration = {}, {}, {"samples": 0}
        with watching(model, layers) as probe:  # which layers the model uses as linear layers (nn/probe.py), seen in the pass that runs anyway
            if method.decomposition and options.calib_samples > 0:
                if tokenizer is None:
                    tokenizer = models.load_tokenizer(source)
                stats, calibration = calibrate(model, tensors if streaming else None, list(layers), tokenizer, options, progress)
                outliers, ratio_info = calibrated_columns(stats, options.threshold, options.outlier_ratio)
                calibration.update(ratio_info)
                input_max = stats.col_max
            else:
                forward_pass(model, tensors if streaming else None, [probe_ids(model)], [], options.threshold)
        kept = probe.reasons
        layers = {name: module for name, module in layers.items() if name not in kept}
        groups, clamped = [], []
        for name in model.state_dict():
            if name not in tensors.parts:
                continue
            layer = name.removesuffix(".weight")
            if name.endswith(".weight") and layer in layers:
                groups.append(quantized_group(layer, layers[layer], tensors, method, dtype, outliers.get(layer), options.clamp_overflow, clamped,
                                              input_max.get(layer), options.smooth_alpha, options.rotation_block))
            else:
                groups.append(plain_group(name, tensors, dtype, options.clamp_overflow, clamped))
        block = fmt.quantization_config(method.name, options.threshold, options.skip, list(layers), dtype, calibration, options.rotation_block)
        if method.smoothing:
            block["smoothing"] = {"alpha": options.smooth_alpha}
        if method.rotation:
            block["rotation"] = {"block": options.rotation_block}
        block["source"] = src if source.kind == "hub" or src in models.ALIASES else str(Path(src).expanduser().absolute())
        if kept:
            block["kept_16bit"] = kept  # linear layers the model does not use as such, and why (nn/probe.py)
        hashes = write_tensors(tmp, groups, options.max_shard_bytes, progress and (lambda done, total: progress("write", done, total)))
        config_dict = config.to_dict()
        config_dict.update({"dtype": str(dtype).removeprefix("torch."), "quantization_config": block})
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        ids, text = check_ids(model, tokenizer if calibration["samples"] else None, options)
        try:
            check = {**check_written(tmp, config, block, model, tensors if streaming else None, ids), "text": text}
        except ConversionError as exc:
            raise ConversionError(f"{out} not written: {exc}") from None
        side_files(source, tmp, model, tokenizer)
        write_manifest(tmp, hashes)
    seconds = time.time() - started
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    size = sum(files.values())
    return {
        "source": str(src), "output": str(out), "method": method.name, "threshold": options.threshold,
        **({"rotation_block": options.rotation_block} if method.rotation else {}),
        "dtype": str(dtype).removeprefix("torch."), "files": files, "size_bytes": size,
        "fp16_size_bytes": fp16_bytes, "ratio_vs_fp16": round(size / fp16_bytes, 4),
        "quantized_layers": len(layers), "parameters": parameter_report(model, layers.values(), kept), "calibration": calibration,
        "outlier_columns": activations.outlier_summary(outliers),
        "outlier_columns_total": sum(int(v.numel()) for v in outliers.values()),
        "clamped_tensors": clamped, "check": check,
        "seconds": round(seconds, 2), "source_mb_per_s": round(source_bytes / 1e6 / max(seconds, 1e-9), 1),
    }


__all__ = ["QuantizeOptions", "quantize_checkpoint"]
