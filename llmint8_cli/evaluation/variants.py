"""The models an evaluation compares: a 16-bit model and its quantized variants, or a stored checkpoint.

A 16-bit MODEL is loaded once and quantized on the fly with each method through the same
quantize_model as `llmint8 quantize` (no second implementation of the math). A quantized llmint8
folder is evaluated as stored; its 16-bit baseline is the source recorded in its config.
"""

from __future__ import annotations

import atexit
import copy
import functools
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from llmint8_cli import distributed, models
from llmint8_cli.backends import cpu_kernels
from llmint8_cli.checkpoint import bitsandbytes
from llmint8_cli.checkpoint.format import is_llmint8_checkpoint, read_quantization_config, stored_rotation_block
from llmint8_cli.checkpoint.load import load
from llmint8_cli.checkpoint.quantize import QuantizeOptions, calibrate, calibrated_columns, check_ids, refuse_given
from llmint8_cli.activations import ActivationStats
from llmint8_cli.core.methods import DEFAULT_SMOOTH_ALPHA, Method, check_outlier_ratio, check_rotation_block, get_method
from llmint8_cli.core.reference import FIRST_ROTATION_BLOCK, ROTATION_BLOCK
from llmint8_cli.errors import InvalidArgumentError, LLMInt8Error
from llmint8_cli.nn import attention
from llmint8_cli.nn.convert import kept_line, parameter_report, quantizable_layers, quantize_model
from llmint8_cli.nn.experts import unfuse_experts
from llmint8_cli.nn.check import check_conversion, originals_in
from llmint8_cli.nn.probe import linear_use
from llmint8_cli.nn.linear import Int8Linear
from llmint8_cli.placement import Placement

BASELINE = "fp16"
DEFAULT_CALIBRATION = QuantizeOptions().calib_dataset
HELD_OUT_CALIBRATION = ("wikitext2", "ptb")  # where the default calibration text is the evaluation text (C4 offline)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RATIO_INFO = ("outlier_ratio", "systematic_columns")  # what calibrated_columns records of a method's outlier ratio
CHOSEN_BY_FOLDER = ("calib_samples", "calib_seq_len", "calib_dataset", "smooth_alpha", "rotation_block", "outlier_ratio")  # --methods and --threshold: check_request


def shown_name(method: str, dtype: torch.dtype) -> str:
    """A table's name for a row: the unquantized baseline by the dtype it ran in (its JSON key stays "fp16", the method)."""
    if method != BASELINE:
        return method
    return f"{next(short for short, full in DTYPES.items() if full == dtype)} (16-bit)"


def resolve_device(option: str) -> torch.device:
    if option == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if option.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgumentError("--device cuda asked for, but no CUDA GPU is available")
    try:
        return torch.device(option)
    except RuntimeError:
        raise InvalidArgumentError(f"unknown device {option!r} (cpu, cuda, cuda:N or auto)") from None


def resolve_dtype(option: str, device: torch.device, inference: bool = False) -> torch.dtype:
    """auto: fp16 on GPU. On CPU, for speed (`inference`, as in bench) bf16 where the CPU has
    native bf16 matmul (AMX-BF16, AVX512-BF16) and fp32 elsewhere, where it runs fastest; for
    evaluation fp32, the dtype every recorded perplexity was computed in (bf16 moves the 16-bit
    baseline itself: bench/results/2026-12-02-bench-cpu-engine.md)."""
    if option == "auto":
        if device.type != "cpu":
            return torch.float16
        return torch.bfloat16 if inference and cpu_kernels.native_bf16() else torch.float32
    if option not in DTYPES:
        raise InvalidArgumentError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {option!r}")
    return DTYPES[option]


@dataclass
class Subject:
    """What is evaluated: a label, its tokenizer, its config and the (method, model) variants."""

    label: str
    source: models.ModelSource  # the files evaluated
    tokenizer: object
    config: object
    variants: Iterator[tuple[str, torch.nn.Module]]
    notes: list[str]
    baseline_source: models.ModelSource | None = None  # a stored folder's recorded 16-bit source
    calibration: dict | None = None  # how the decomposition methods found their stored columns
    stored: bool = False  # an llmint8 folder, evaluated as written (its files key its caches)
    rotation_block: int = ROTATION_BLOCK  # the Hadamard block width of the rotation methods
    thresholds: dict[str, float] = field(default_factory=dict)  # the outlier threshold each quantized variant runs at
    stored_columns: dict[str, int] = field(default_factory=dict)  # on the fly: each decomposition variant's calibrated 16-bit columns
    ratio_info: dict[str, dict] = field(default_factory=dict)  # on the fly: each variant's outlier ratio and the columns it added (calibrated_columns)
    parameters: dict = field(default_factory=dict)  # nn.convert.parameter_report: the int8 share and what stays 16-bit unasked

    @property
    def warnings(self) -> list[str]:
        """What a user must see on stderr, even with -q: matrices that stay 16-bit unasked."""
        line = kept_line(self.parameters) if self.parameters else None
        return [line] if line else []
    _fingerprints: dict = field(default_factory=dict, repr=False)

    def threshold_of(self, method: str) -> float | None:
        """The outlier threshold a variant runs at (None: the 16-bit baseline)."""
        return self.thresholds.get(method)

    def calibration_of(self, method: str) -> dict | None:
        """The calibration a variant's stored outlier columns come from (None: it stores none)."""
        if self.calibration is None or not get_method(method).decomposition:
            return None
        if method not in self.stored_columns:
            return self.calibration
        return {**self.calibration, **self.ratio_info.get(method, {}), "outlier_columns_total": self.stored_columns[method]}

    @property
    def calibration_key(self) -> str:
        """Part of a cache folder's name for on-the-fly variants: run-time detection only, or the calibration set used."""
        info = self.calibration or {}
        if not info.get("samples") or self.stored:
            return ""
        return f"calib{info['samples']}x{info['seq_len']}-{info['dataset']}"

    def ratio_key(self, method: str) -> str:
        """Part of a cache folder's name: the outlier ratio, where it stored columns the threshold alone does not (else the model is the same)."""
        info = self.ratio_info.get(method, {})
        return f"-ratio{info['outlier_ratio']:g}" if info.get("systematic_columns") else ""

    def settings_of(self, method: str) -> dict:
        """A variant's settings beyond method and threshold, for the JSON (the rotation block of a rotation method)."""
        return {"rotation_block": self.rotation_block} if get_method(method).rotation else {}

    def source_of(self, variant: str) -> models.ModelSource:
        """The files a variant is computed from: a stored folder's baseline is its 16-bit source."""
        return self.baseline_source if variant == BASELINE and self.baseline_source else self.source

    def fingerprint_of(self, source: models.ModelSource) -> str:
        """Hashes the model's files, so only runs that keep a cache pay for it, and once per run."""
        if source not in self._fingerprints:
            self._fingerprints[source] = models.fingerprint(source)
        return self._fingerprints[source]


def subject(spec: str, methods: list[Method], threshold: float | None, dtype: torch.dtype, device: torch.device, verify: bool = True,
            calibration: QuantizeOptions | None = None, held_out: str | None = None, placement: Placement | None = None) -> Subject:
    """What to evaluate; `verify` checks an llmint8 folder's files against its manifest; a
    `placement` spreads each model over devices instead of putting it on `device`.

    A 16-bit model's decomposition methods are calibrated as `llmint8 quantize` calibrates them
    (`calibration`, its options; None or 0 samples: run-time detection only), so that their
    numbers are those of the folder quantize would write. `threshold` None runs each method at
    its own default. `held_out` is the evaluation text's source: calibrating on it is refused.
    """
    given = calibration.given if calibration else frozenset()
    wanted = {m.name for m in methods if m.quantized}
    if calibration and calibration.outlier_ratio is not None:  # before a load and a calibration of minutes
        check_outlier_ratio(calibration.outlier_ratio)
    if is_llmint8_checkpoint(spec):
        check_request(spec, read_quantization_config(spec), given, wanted, threshold)
        return _stored(spec, dtype, device, verify, held_out, placement=placement)
    if bitsandbytes.is_bitsandbytes_8bit(spec):  # evaluated as its int8 rows, converted without re-rounding
        method, stored_threshold = bitsandbytes.converted_method(bitsandbytes.read_block(Path(spec)))
        check_request(spec, {"method": method, "threshold": stored_threshold}, given, wanted, threshold)  # before a conversion of minutes
        folder = Path(tempfile.mkdtemp(prefix="llmint8-from-bitsandbytes-"))
        atexit.register(shutil.rmtree, folder, True)
        bitsandbytes.import_folder(spec, str(folder / "model"))
        converted = _stored(str(folder / "model"), dtype, device, verify, label=spec, placement=placement)
        converted.notes.append(f"{spec}: a bitsandbytes 8-bit folder, evaluated through llmint8 with its int8 rows and scales as stored")
        return converted
    source = models.resolve(spec)
    ordered = [BASELINE] + [m.name for m in methods if m.name != BASELINE]
    thresholds = {m.name: m.threshold_or_default(threshold) for m in methods if m.quantized}
    rotation_block = check_rotation_block(calibration.rotation_block) if calibration else ROTATION_BLOCK
    calibrated = calibration is not None and calibration.calib_samples > 0
    smoothing = [m.name for m in methods if m.smoothing]
    if smoothing and not calibrated:
        raise InvalidArgumentError(f"method {smoothing[0]!r} is calibrated: --calib-samples must be at least 1")
    tokenizer = models.load_tokenizer(source)
    if placement is not None:
        return _streamed(spec, source, tokenizer, ordered, thresholds, dtype, placement, calibration, held_out, rotation_block)
    base = models.load_model(source, dtype=dtype).to(device)
    unfuse_experts(base)  # experts as linear layers, quantized like any other (the same function in 16-bit)
    kept = linear_use(base, dict(quantizable_layers(base)))  # linear layers the model does not use as such stay 16-bit, in every variant
    outliers, ratio_info, input_max, info, stats = {}, {}, {}, None, None
    decomposing = [m.name for m in methods if m.decomposition]
    if calibrated and decomposing:  # one pass; each method's stored columns at its own threshold
        options = replace(calibration, threshold=min(thresholds[n] for n in decomposing))
        # under torchrun on rank 0 only, every process then quantizes with the same columns
        stats, info = distributed.from_main(lambda: calibrate_on_the_fly(base, tokenizer, options, held_out), "sharing the calibration")
        chosen = {n: calibrated_columns(stats, thresholds[n], get_method(n).outlier_ratio_or_default(calibration.outlier_ratio)) for n in decomposing}
        outliers, ratio_info = {n: columns for n, (columns, _) in chosen.items()}, {n: recorded for n, (_, recorded) in chosen.items() if recorded}
        input_max = stats.col_max
        if smoothing:
            info["smoothing_alpha"] = calibration.smooth_alpha

    @functools.cache
    def check_tokens() -> torch.Tensor:  # the calibration text's where a calibration ran, as quantize's check
        return check_ids(base, tokenizer if info is not None else None, calibration or QuantizeOptions())[0]

    def variant(name: str) -> torch.nn.Module:
        method = get_method(name)
        if not method.quantized:
            return base
        converted = quantize_model(copy.deepcopy(base), name, thresholds[name], outliers=outliers.get(name),
                                   input_max=input_max if method.smoothing else None, alpha=calibration.smooth_alpha if calibration else DEFAULT_SMOOTH_ALPHA,
                                   rotation_block=rotation_block, kept=kept)
        check_conversion(converted, originals_in(base, converted), check_tokens())  # as quantize checks what it writes (nn/check.py)
        return converted

    def generate() -> Iterator[tuple[str, torch.nn.Module]]:
        for name in ordered:
            yield name, variant(name)

    stored_columns = {n: sum(int(v.numel()) for v in columns.values()) for n, columns in outliers.items()}
    parameters = parameter_report(base, [module for name, module in quantizable_layers(base) if name not in kept], kept)
    return Subject(source.label, source, tokenizer, base.config, generate(), [], calibration=info, rotation_block=rotation_block, thresholds=thresholds,
                   stored_columns=stored_columns, ratio_info=ratio_info, parameters=parameters)


def load_folder(folder, dtype: torch.dtype, verify: bool, device: torch.device, placement: Placement | None) -> torch.nn.Module:
    """An llmint8 folder on `device`, or spread over devices as `placement` says."""
    if placement is None:
        return load(folder, dtype=dtype, verify_files=verify).to(device)
    return load(folder, dtype=dtype, verify_files=verify, device_map=placement)


def placed_quantized(spec: str, folder: Path, options: QuantizeOptions, dtype: torch.dtype, placement: Placement) -> tuple[torch.nn.Module, dict]:
    """(the model `llmint8 quantize` would write, loaded spread over devices; quantize's summary):
    streamed one layer at a time into `folder`, so the 16-bit model is never whole in memory."""
    from llmint8_cli.checkpoint.quantize import quantize_checkpoint

    summary = quantize_checkpoint(spec, folder, options)
    return load_folder(folder, dtype, False, None, placement), summary  # written by this run a moment ago: no verification


def scratch_folder(placement: Placement) -> Path:
    """A folder for quantized copies, removed at exit: beside the offloaded layers where the user
    chose a disk for them."""
    if placement.offload_folder:
        Path(placement.offload_folder).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="llmint8-placed-", dir=placement.offload_folder))
    atexit.register(shutil.rmtree, work, True)
    return work


def _streamed(spec: str, source: models.ModelSource, tokenizer, ordered: list[str], thresholds: dict[str, float], dtype: torch.dtype, placement: Placement,
              calibration: QuantizeOptions | None, held_out: str | None, rotation_block: int) -> Subject:
    """On the fly for a model spread over devices: the 16-bit model loaded placed, and each method
    quantized as `llmint8 quantize` streams it (placed_quantized), one method at a time."""
    config = models.load_config(source)
    skeleton = models.build_skeleton(lambda: models.causal_lm_from_config(config, dtype), f"{source.location}: config")
    unfuse_experts(skeleton)
    options = calibration or QuantizeOptions(calib_samples=0)
    options, note = held_out_options(options, held_out) if options.calib_samples > 0 else (options, None)
    smoothing = any(get_method(n).smoothing for n in ordered)
    # the copies keep what is not int8 as a one-device evaluation computes it: an fp32 source's in the compute dtype, not rounded to fp16
    stored = "auto" if getattr(config, "dtype", None) in (torch.float16, torch.bfloat16) else next(short for short, full in DTYPES.items() if full == dtype)
    result = Subject(source.label, source, tokenizer, config, iter(()), [], thresholds=thresholds, rotation_block=rotation_block,
                     parameters=parameter_report(skeleton, [module for _, module in quantizable_layers(skeleton)]))
    work = scratch_folder(placement)

    def generate() -> Iterator[tuple[str, torch.nn.Module]]:
        for name in ordered:
            if name == BASELINE:
                yield name, models.load_model(source, dtype=dtype, placement=placement)
                continue
            chosen = replace(options, method=name, threshold=thresholds[name], rotation_block=rotation_block, dtype=stored, given=frozenset())
            model, summary = placed_quantized(spec, work / name, chosen, dtype, placement)
            result.parameters = summary["parameters"]  # with the layers quantize kept 16-bit, and why
            if get_method(name).decomposition and summary["calibration"].get("samples"):  # recorded as the in-memory path's one calibration records it
                shared = {k: v for k, v in summary["calibration"].items() if k not in RATIO_INFO}  # the ratio is each method's own
                result.calibration = {**shared, **({"note": note} if note else {}), **({"smoothing_alpha": options.smooth_alpha} if smoothing else {})}
                result.stored_columns[name] = summary["outlier_columns_total"]
                result.ratio_info[name] = {k: summary["calibration"][k] for k in RATIO_INFO if k in summary["calibration"]}
            yield name, model
            shutil.rmtree(work / name, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    result.variants = generate()
    return result


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(subject: Subject, methods: list[Method], calibration: QuantizeOptions | None) -> dict[str, str]:
    """What the processes of a torchrun must agree on besides their data (distributed.agree): the
    model's files (and a stored folder's 16-bit source), and the methods with the settings each
    process applies (calibration itself runs on rank 0 alone, its columns shared)."""
    sources = [subject.source, *([subject.baseline_source] if subject.baseline_source else [])]
    applied = {} if calibration is None else {key: getattr(calibration, key) for key in ("smooth_alpha", "outlier_ratio")}  # by each process to rank 0's calibration
    settings = {"methods": [m.name for m in methods], "thresholds": subject.thresholds, "rotation_block": subject.rotation_block, **applied}
    return {"the model files": digest([models.quick_identity(source) for source in sources]), "the methods and their settings": digest(settings)}


def calibration_line(subject: Subject) -> str:
    """One line under a table: where the decomposition methods' stored 16-bit columns came from."""
    info = subject.calibration or {}
    if not info.get("samples"):
        return "outlier columns: run-time detection only (no calibration)"
    counts = {}  # stored columns by threshold and ratio: methods at the same ones store the same columns
    for name, columns in subject.stored_columns.items():
        counts.setdefault((subject.threshold_of(name), subject.ratio_info.get(name, {}).get("outlier_ratio", 0)), columns)
    stored = ""  # a stored folder's count is in its quantize summary
    if len(counts) > 1:
        stored = ", stored outlier columns " + ", ".join(f"{n} at threshold {t:g}" + (f" and ratio {r:g}" if r else "") for (t, r), n in sorted(counts.items()))
    elif counts:
        stored = f", {next(iter(counts.values()))} stored outlier columns"
    smoothing = f", smoothing alpha {info['smoothing_alpha']:g}" if "smoothing_alpha" in info else ""
    return f"calibration of the decomposition methods: {info['samples']} windows × {info['seq_len']} tokens of {info['dataset']}{stored}{smoothing}"


def held_out_options(options: QuantizeOptions, held_out: str | None) -> tuple[QuantizeOptions, str | None]:
    """Calibration that never reads the evaluation text: the default text is swapped for another
    (with a note saying so), a chosen one is refused."""
    from llmint8_cli import data

    if held_out is None or data.calibration_text(options.calib_dataset, options.data_dir).source != held_out:
        return options, None
    if options.calib_dataset != DEFAULT_CALIBRATION:
        raise InvalidArgumentError(
            f"the calibration text ({options.calib_dataset}, {held_out}) is the evaluation text; pass another --calib-dataset, or --calib-samples 0"
        )
    other = next(name for name in HELD_OUT_CALIBRATION if data.calibration_text(name, options.data_dir).source != held_out)
    return replace(options, calib_dataset=other), f"the default calibration text here is the evaluation text ({held_out}); calibrated on {other} instead"


def calibrate_on_the_fly(base, tokenizer, options: QuantizeOptions, held_out: str | None) -> tuple[ActivationStats, dict]:
    """quantize's calibration on the loaded 16-bit model: (each layer's input ranges and outlier columns, what was used)."""
    options, note = held_out_options(options, held_out)
    with torch.no_grad():
        stats, info = calibrate(base, None, [name for name, _ in quantizable_layers(base)], tokenizer, options)
    if note:
        info["note"] = note
    return stats, info


def check_request(label: str, block: dict, given: frozenset[str], wanted: set[str], threshold: float | None, method_option: str = "methods",
                  use: str = "evaluated as stored", instead: str = "evaluate the 16-bit model it came from to compare methods or settings") -> None:
    """A quantized folder is used as stored: asking it for another method (`wanted`), threshold or
    calibration setting is refused in one line, never dropped (`given`: the options a user typed)."""
    what = f"{label} is a quantized folder ({block['method']}, threshold {block['threshold']:g}) {use}"
    refuse_given(given, CHOSEN_BY_FOLDER, what, instead)
    asked = [*([f"--{method_option}"] if method_option in given and wanted != {block["method"]} else []),
             *(["--threshold"] if "threshold" in given and threshold != block["threshold"] else [])]
    if asked:
        raise InvalidArgumentError(f"{what}: {', '.join(asked)} cannot apply; {instead}")


def _stored(folder: str, dtype: torch.dtype, device: torch.device, verify: bool, held_out: str | None = None, label: str | None = None,
            placement: Placement | None = None) -> Subject:
    """A quantized folder evaluated as stored; `label` names it in messages (a bitsandbytes folder converted into a temporary one)."""
    label = label or folder
    block = read_quantization_config(folder)
    quantized = load_folder(folder, dtype, verify, device, placement)  # verifies the folder: nothing of it is read before
    tokenizer = models.load_tokenizer(models.ModelSource("folder", str(folder)))
    notes, baseline = [], None
    calibration = block.get("calibration") or {}
    if isinstance(block.get("smoothing"), dict):
        calibration = {**calibration, "smoothing_alpha": block["smoothing"].get("alpha")}
    if held_out is not None and calibration.get("samples") and calibration.get("source") == held_out:
        notes.append(f"{folder} was calibrated on the evaluation text ({held_out}): its stored outlier columns saw this text, so the result is not held out")
    recorded = block.get("source")
    if not isinstance(recorded, str) or not recorded:  # never resolved against the working directory
        notes.append(f"{label} records no 16-bit source (bitsandbytes folders do not): no 16-bit baseline, no delta reported")
    else:
        try:
            baseline = models.resolve(recorded)
        except LLMInt8Error as exc:
            notes.append(f"16-bit baseline unavailable ({exc}); no delta reported")

    def generate() -> Iterator[tuple[str, torch.nn.Module]]:
        if baseline is not None:
            yield BASELINE, models.load_model(baseline, dtype=dtype, placement=placement) if placement else models.load_model(baseline, dtype=dtype).to(device)
        yield block["method"], quantized

    parameters = parameter_report(quantized, [m for m in quantized.modules() if isinstance(m, Int8Linear)], block.get("kept_16bit"))
    return Subject(label, models.ModelSource("folder", str(folder)), tokenizer, quantized.config, generate(), notes, baseline, calibration=calibration, stored=True,
                   rotation_block=stored_rotation_block(block) or ROTATION_BLOCK, thresholds={block["method"]: block["threshold"]}, parameters=parameters)


def cache_folder(cache_dir: str, subject: Subject, method: str, dtype: torch.dtype, device: torch.device, int8_head: bool = False) -> Path:
    """The folder (created) where one variant's evaluation results are kept, so that a stopped run resumes.

    Everything that changes the model's outputs is in the path: the model's files (fingerprint),
    the method, threshold and rotation block, the calibration and the outlier ratio where it added
    columns, an int8 LM head, the native attention (bf16 on the CPU), the compute dtype and the device type. A stored folder's 16-bit
    baseline is keyed by its source, so it is shared with the runs on the 16-bit model.
    """
    setting = method if method == BASELINE else f"{method}-t{subject.threshold_of(method):g}"
    if subject.calibration_of(method) and subject.calibration_key:  # stored columns change the outputs
        setting += f"-{subject.calibration_key}{subject.ratio_key(method)}"
        if get_method(method).smoothing:
            setting += f"-a{subject.calibration['smoothing_alpha']:g}"
    if get_method(method).rotation and subject.rotation_block != FIRST_ROTATION_BLOCK:  # older caches name no block
        setting += f"-r{subject.rotation_block}"
    if int8_head:
        setting += "-int8head"
    if dtype == torch.bfloat16 and device.type == "cpu" and attention.native_attention_here():  # prompts' attention through llmint8's kernel
        setting += "-native-attention"
    source = subject.source_of(method)
    model = "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(source.label).name)
    folder = Path(cache_dir) / f"{model}-{subject.fingerprint_of(source)}" / f"{setting}-{str(dtype).removeprefix('torch.')}-{device.type}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidArgumentError(f"--cache-dir {cache_dir}: cannot create {folder} ({exc.strerror or exc})") from None
    return folder
