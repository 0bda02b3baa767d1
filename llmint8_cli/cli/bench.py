"""llmint8 bench [MODEL]: layer speed (the paper's Table 5 shapes) or end-to-end model speed."""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from llmint8_cli import compilation, models
from llmint8_cli.backends import gemm_report
from llmint8_cli.checkpoint.quantize import QuantizeOptions
from llmint8_cli.cli.common import (
    PIPED_MODEL_HELP, CalibDataset, CalibSamples, CalibSeqLen, ComputeDtype, DataDir, Device, DeviceMap, MaxMemory, NoVerify, OffloadFolder, Quiet, TrustRemoteCode, OutlierRatio, RotationBlock, SmoothAlpha,
    Threshold, choose_model, chosen_placement, command, emit_json, print_table, progress_bar, report_placement, stderr_console,
)
from llmint8_cli.core.methods import DEFAULT_METHOD, check_rotation_block, get_method
from llmint8_cli.errors import InvalidArgumentError
from llmint8_cli.evaluation import peers as peer_engines
from llmint8_cli.evaluation import speed, variants
from llmint8_cli.nn.convert import INT8_HEAD_HELP, INT8_HEAD_PLACED, check_int8_head


TORCHAO = "torchao W8A8"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    if text == "paper":
        return speed.paper_shapes()
    shapes = []
    for part in text.split(","):
        try:
            out_f, in_f = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise InvalidArgumentError(f"--shapes: {part!r} is not OUTxIN (e.g. 4096x4096) or 'paper'") from None
        if out_f < 1 or in_f < 1:
            raise InvalidArgumentError(f"--shapes: {part!r} has a zero dimension")
        shapes.append((out_f, in_f))
    return shapes


def parse_ints(text: str, option: str, minimum: int = 0) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InvalidArgumentError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise InvalidArgumentError(f"{option}: expected integers >= {minimum}, got {text!r}")
    return values


LAYER_BYTES_PER_WEIGHT = 14  # fp32 + bf16 + fp16 copies, int8 rows and a peer's copy of each weight


def check_layer_sizes(shapes: list[tuple[int, int]], outliers: list[int]) -> None:
    """Refuse at once what cannot run: more outlier columns than inputs, weights beyond the RAM."""
    for out_f, in_f in shapes:
        if max(outliers) > in_f:
            raise InvalidArgumentError(f"--outlier-cols {max(outliers)} exceeds the {in_f} input features of {out_f}x{in_f}")
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):  # the OS does not tell
        return
    largest = max(shapes, key=lambda s: s[0] * s[1])
    needed = largest[0] * largest[1] * LAYER_BYTES_PER_WEIGHT
    if needed > available:
        raise InvalidArgumentError(f"--shapes {largest[0]}x{largest[1]} needs about {needed / 2**30:.1f} GiB for its layers, {available / 2**30:.1f} GiB free")


@contextlib.contextmanager
def peer_folder(wanted: bool):
    """A temporary folder for the peer engines' copies of the model (None where no peer is timed), removed at the end."""
    if not wanted:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="llmint8-peers-") as folder:
        yield Path(folder)


def check_context(config, lengths: list[int], new_tokens: int) -> None:
    limit = models.context_length(config)
    if limit is not None and max(lengths) + new_tokens > limit:
        raise InvalidArgumentError(f"--prompt-tokens {max(lengths)} and --new-tokens {new_tokens} exceed the model's context ({limit} tokens)")


def decode_step_line(name: str, parts: dict) -> str:
    """One line on where an eager decode step's time went (speed.decode_step_parts)."""
    int8 = f"int8 linears {parts['int8_linears_ms']:.1f} ms ({parts['int8_linear_calls']} calls, {parts['int8_weights_gb_per_s']:.1f} GB/s) + " if "int8_weights_gb_per_s" in parts else ""
    head = f", the head at {parts['head_gb_per_s']:.1f} GB/s" if "head_gb_per_s" in parts else ""
    return (f"{name}: an eager decode step {parts['step_ms']:.1f} ms = {int8}16-bit linears {parts['sixteen_bit_linears_ms']:.1f} ms{head} "
            f"+ the rest {parts['rest_ms']:.1f} ms")


@command
def bench(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(help=f"Model mode: a 16-bit model (quantized on the fly) or an llmint8 folder. {PIPED_MODEL_HELP}, else layer mode.", show_default=False)] = None,
    shapes: Annotated[str, typer.Option(help="Layer mode: OUTxIN weight shapes, comma-separated, or 'paper' (Table 5: 4d x d for eight d).")] = "4096x4096",
    tokens: Annotated[str, typer.Option(help="Layer mode: token counts m per call.")] = "1,16,128,512,2048",
    outlier_cols: Annotated[str, typer.Option(help="Layer mode: outlier feature columns for the llm.int8 rows.")] = "0,6,64",
    method: Annotated[str, typer.Option(help="Model mode: quantization method.")] = DEFAULT_METHOD,
    threshold: Threshold = None,
    calib_samples: CalibSamples = QuantizeOptions.calib_samples,
    calib_seq_len: CalibSeqLen = QuantizeOptions.calib_seq_len,
    calib_dataset: CalibDataset = QuantizeOptions.calib_dataset,
    smooth_alpha: SmoothAlpha = QuantizeOptions.smooth_alpha,
    rotation_block: RotationBlock = QuantizeOptions.rotation_block,
    outlier_ratio: OutlierRatio = QuantizeOptions.outlier_ratio,
    data_dir: DataDir = None,
    prompt_tokens: Annotated[str, typer.Option(help="Model mode: prefill lengths, comma-separated.")] = "128,512",
    new_tokens: Annotated[int, typer.Option(min=1, help="Model mode: tokens decoded.")] = 32,
    batch: Annotated[str, typer.Option(help="Model mode: how many sequences are decoded together, comma-separated.")] = "1,8",
    dtype: ComputeDtype = "auto",
    repeat: Annotated[int, typer.Option(min=1, help="Timed calls per row (after one warm-up).")] = 5,
    device: Device = "cpu",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    random_weights: Annotated[bool, typer.Option("--random-weights", help="Model mode: only MODEL's shape (a shipped one such as llama-3-8b or opt-13b, a config.json, "
                                                 "or a model's own config) with random weights, to see what int8 brings before downloading a model. "
                                                 "A config.json MODEL implies it.")] = False,
    peers: Annotated[bool, typer.Option("--peers/--no-peers", help="Also time the engines a user would pick instead, on the same weights, each where "
                                        "installed: bitsandbytes and torchao layers in layer mode; torchao W8A8, CTranslate2 int8 and "
                                        "fp32, llama.cpp Q8_0 in model mode on the CPU.")] = True,
    int8_head: Annotated[bool, typer.Option("--int8-head", help="Model mode: time the int8 model again with its LM head in int8 too (another row, "
                                             "after the others). " + INT8_HEAD_HELP)] = False,
    compile: Annotated[str, typer.Option("--compile", help="Model mode: " + compilation.HELP + " auto compiles every model of "
                                         f"{compilation.AUTO_PARAMETERS // 10**6}M parameters and more; compile seconds go in the JSON apart.")] = "auto",
    no_verify: NoVerify = False,
    trust_remote_code: TrustRemoteCode = False,
    quiet: Quiet = False,
) -> None:
    """Time 16-bit versus int8 layers or models; JSON on stdout, a table on stderr."""
    console = stderr_console(quiet)
    model = choose_model(model, console)
    placed, run_device = chosen_placement(ctx, device, device_map, max_memory, offload_folder)
    compilation.check_choice(compile, run_device if model is not None else None)  # layer mode: the value alone
    if model is not None:
        if placed is not None and compile == "on":
            raise InvalidArgumentError("--compile on: a model spread over devices (--device-map) runs eager")
        if placed is not None and int8_head:
            raise InvalidArgumentError(INT8_HEAD_PLACED)
    document = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": str(run_device), "machine": speed.machine()}
    if model is None:
        if int8_head:
            raise InvalidArgumentError("--int8-head is for model mode: give MODEL")
        if random_weights:
            raise InvalidArgumentError("--random-weights is for model mode: give MODEL (a shape such as llama-3-8b, or a config.json)")
        if compile == "on":
            raise InvalidArgumentError("--compile is for model mode; layer mode times eager calls")
        if threshold is not None:
            raise InvalidArgumentError("--threshold is for model mode; layer mode plants outliers of about 20 and runs each method at its default threshold")
        if placed is not None:
            raise InvalidArgumentError("--device-map is for model mode; layer mode times one layer on --device")
        shape_list, token_list, outliers = parse_shapes(shapes), parse_ints(tokens, "--tokens", minimum=1), parse_ints(outlier_cols, "--outlier-cols")
        check_layer_sizes(shape_list, outliers)
        block = check_rotation_block(rotation_block)
        rows, notes = [], []
        with progress_bar(console) as bar:
            task = bar.add_task("layers", total=len(shape_list) * len(token_list) * (4 + len(outliers) + (len(speed.PEERS) if peers else 0)))
            for out_f, in_f in shape_list:
                rows += speed.bench_layer(out_f, in_f, token_list, outliers, repeat, run_device, with_peers=peers, progress=lambda: bar.advance(task), notes=notes,
                                          rotation_block=block)
        document.update({"mode": "layer", "repeat": repeat, "rows": rows, "notes": notes})
        title = f"llmint8 bench · layers · {document['machine']['cpu']} · {document['machine']['threads']} threads · {run_device}"
        cells = [[
            r["shape"], str(r["tokens"]), r["row"], f"{r['median_ms']:.3f}", f"{r['min_ms']:.2f}–{r['max_ms']:.2f}", f"{r['speedup_vs_16bit']:.2f}",
            f"{r['speedup_vs_best_float']:.2f}", f"{r['rel_error_vs_fp32']:.1e}", f"{r['weight_mib']:.1f}",
        ] for r in rows]
        table = (title, ["shape", "m", "row", "median ms", "min–max ms", "× 16-bit", "× best float", "rel. err", "weight MiB"], cells,
                 ("min–max ms", "weight MiB", "× best float", "rel. err"))
        for note in notes:
            console.print(f"note: {note}")
    else:
        lengths, batches = parse_ints(prompt_tokens, "--prompt-tokens", minimum=1), parse_ints(batch, "--batch", minimum=1)
        run_dtype = variants.resolve_dtype(dtype, run_device, inference=True)
        baseline = next(short for short, full in variants.DTYPES.items() if full == run_dtype)  # the 16-bit row, named by what ran
        if random_weights or model.endswith(".json"):
            if placed is not None:
                raise InvalidArgumentError("--random-weights builds the model on --device; --device-map places a model's own weights")
            config, label = models.shape_config(model)
            check_context(config, lengths, new_tokens)
            if int8_head:
                check_int8_head([method])
            notes = [f"random weights in the shape of {label}: speed only; {method} at run-time outlier detection (nothing to calibrate), "
                     "the models timed one after the other"]
            with console.status(f"{label} with random weights: timing the {baseline} model, then {method} (quantized in place), then the peers"), \
                    peer_folder(peers and run_device.type == "cpu") as folder:
                results = speed.bench_random_weights(config, label, method, threshold, run_dtype, run_device, baseline, lengths, batches, new_tokens, repeat,
                                                     folder, notes, compile, int8_head)
            document.update({"weights": "random", "shape": label, "threshold": get_method(method).threshold_or_default(threshold), "calibration": {method: None}})
        else:
            # a 16-bit model is calibrated as quantize calibrates it: the speed of the folder a user would get
            calibration = QuantizeOptions(calib_samples=calib_samples, calib_seq_len=calib_seq_len, calib_dataset=calib_dataset, data_dir=data_dir, smooth_alpha=smooth_alpha,
                                          rotation_block=rotation_block, outlier_ratio=outlier_ratio)
            with console.status(f"loading {model}"):
                subject = variants.subject(model, [get_method(method)], threshold, run_dtype, run_device, verify=not no_verify, calibration=calibration,
                                           placement=placed)
            check_context(subject.config, lengths, new_tokens)
            if int8_head:
                check_int8_head(subject.thresholds)  # the method that runs: a stored folder's own
            label, notes = subject.label, list(subject.notes)
            networks, calibrations, placements = {}, {}, {}
            for name, network in subject.variants:
                networks[baseline if name == variants.BASELINE else name] = network
                where = report_placement(console, name, network)
                if where:
                    placements[name] = where
                if name != variants.BASELINE:
                    calibrations[name] = subject.calibration_of(name)
                elif placed is not None:
                    notes.append("peers: not timed on a model spread over devices")
                elif peers and run_device.type == "cpu":
                    try:
                        networks[TORCHAO] = speed.torchao_model(network)
                    except ImportError as exc:
                        notes.append(f"{TORCHAO}: not installed ({exc.name}); pip install 'llmint8[peers]'")
            console.print(variants.calibration_line(subject))  # known once every variant is built (a placed one is quantized as it comes)
            compiling = placed is None and compilation.decide(compile, run_device, compilation.large_enough(next(iter(networks.values()))), notes)
            with console.status("timing prefill and decode, our models in turn" + (" (compiling each shape first)" if compiling else "")):
                results = speed.bench_models(networks, lengths, batches, new_tokens, repeat, run_device, compile_choice=compile if compiling else None, notes=notes)
            quantized = next((name for name in networks if name in calibrations), None)
            if int8_head and quantized is not None:
                with console.status("timing prefill and decode, the int8 model again with an int8 LM head"):
                    results.update(speed.bench_int8_head(networks[quantized], quantized, lengths, batches, new_tokens, repeat, run_device,
                                                         compile if compiling else None, notes))
            # the peers after ours, not in turn with them: their threads may spin on after each call (llama.cpp's pool polls) and slow the next
            with peer_folder(peers and placed is None and run_device.type == "cpu" and baseline in networks) as folder:
                if folder is not None:
                    with console.status("converting the model for the peer engines"):
                        engines = peer_engines.engines(peer_engines.save_16bit(networks[baseline], folder / "model"), lengths, batches, new_tokens, notes)
                    if engines:
                        with console.status("timing prefill and decode, the peers in turn"):
                            results.update(speed.bench_models(engines, lengths, batches, new_tokens, repeat, run_device, vocab_size=subject.config.get_text_config().vocab_size))
            document.update({
                "weights": "given", "threshold": subject.threshold_of(method), "calibration": calibrations,
                "settings": {name: subject.settings_of(name) for name in calibrations if subject.settings_of(name)}, **({"placement": placements} if placements else {}),
            })
        if baseline in results:
            speed.add_speedups(results, baseline)
        elif document["weights"] == "given":  # a folder that records no 16-bit source (bitsandbytes'): no ratios, no peers
            notes.append("no 16-bit model: no ratios, and no peers (they are converted from it)")
        document.update({
            "mode": "model", "compile": compile, "inductor_cache": str(compilation.cache_folder()) if any(r.get("compiled") for r in results.values()) else None,
            "dtype": str(run_dtype).removeprefix("torch."), "prompt_tokens": lengths, "batches": batches,
            "new_tokens": new_tokens, "repeat": repeat, "results": results, "notes": notes,
        })
        title = f"llmint8 bench · {label}{' (random weights)' if document['weights'] == 'random' else ''} · {str(run_dtype).removeprefix('torch.')} · {document['machine']['cpu']} · {run_device}"
        columns = [("prefill", str(n), f"prefill {n} tok/s") for n in lengths] + [("decode", str(b), f"decode ×{b} tok/s") for b in batches]
        cells = [[name, *(f"{r[phase][size]['tokens_per_s']:.0f}" + (f" ({r[phase][size]['speedup']:.2f}×)" if "speedup" in r[phase][size] else "") for phase, size, _ in columns),
                  f"{r['weight_mib']:.0f}", f"{sum(s for s in r['compile_s'].values() if s):.0f}" if r.get("compiled") else "eager"] for name, r in results.items()]
        table = (title, ["variant", *(c[2] for c in columns), "weights MiB", "compile s"], cells, ("weights MiB", "compile s"))
        for name, r in results.items():
            if "decode_step" in r:
                console.print(decode_step_line(name, r["decode_step"]), highlight=False)
        for note in notes:
            console.print(f"note: {note}")
    document["int8_gemm"] = gemm_report()
    print_table(console, *table)
    emit_json("bench", model, document)

