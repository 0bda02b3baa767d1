"""llmint8 eval-ppl MODEL: perplexity of the 16-bit model and each method, side by side."""

from __future__ import annotations

import math
import time
from typing import Annotated

import typer

from llmint8_cli import data, distributed
from llmint8_cli.backends import gemm_report
from llmint8_cli import models
from llmint8_cli.checkpoint.quantize import QuantizeOptions
from llmint8_cli.cli.common import EXIT_NOT_FINITE, METHODS_HELP, CalibDataset, CalibSamples, CalibSeqLen, OutlierRatio, RotationBlock, SmoothAlpha, ComputeDtype, DataDir, Device, DeviceMap, MaxMemory, Model, NoVerify, OffloadFolder, Quiet, TrustRemoteCode, Threshold, choose_model, evaluation_placement, command, emit_json, given_options, fail, report_placement, print_table, progress_bar, stderr_console, warn
from llmint8_cli.core.methods import DEFAULT_METHOD, parse_methods
from llmint8_cli.errors import DataError, InvalidArgumentError
from llmint8_cli.evaluation import variants
from llmint8_cli.evaluation.perplexity import WindowCache, make_windows, perplexity, tokenize
from llmint8_cli.nn.convert import INT8_HEAD_HELP, INT8_HEAD_PLACED, check_int8_head, int8_head_label, quantize_head

DATASET_HELP = (
    "wikitext2 (raw test, rows joined with blank lines), ptb (test sentences joined with spaces), "
    "c4 (first 1,100 validation documents; offline a local sample, labelled as such), "
    "or a path to a .txt (read as is) or .jsonl ('text' fields joined with blank lines)."
)
NOT_FINITE = "the model's output holds NaN or Inf (an overflowing weight or activation in this compute dtype)"
BOS_HELP = (
    "window: every window opens with BOS when the tokenizer adds one to a fresh sequence (default); "
    "text: the tokenizer's BOS only at the start of the text. "
    "Either way a window's first text token is context only (not scored)."
)


def computed_rate(result, seconds: float) -> float | None:
    """Scored tokens per second over the windows this run computed (cached ones took no time)."""
    computed = result.windows - result.reused
    return round(result.tokens * computed / result.windows / seconds, 1) if computed else None


@command
def eval_ppl(
    ctx: typer.Context,
    model: Model = None,
    dataset: Annotated[str, typer.Option(help=DATASET_HELP)] = "wikitext2",
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 2048,
    stride: Annotated[int | None, typer.Option(help="Start a window every N tokens (default: no overlap); overlapping tokens are scored once.")] = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="Use only the first N tokens of the text.")] = None,
    methods: Annotated[str, typer.Option(help=METHODS_HELP)] = DEFAULT_METHOD,
    threshold: Threshold = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per forward pass (results do not depend on it).")] = 1,
    bos: Annotated[str, typer.Option(help=BOS_HELP)] = "window",
    cache_dir: Annotated[str | None, typer.Option(help="Keep each window's NLL here as it is computed: a stopped run, or a later run of other methods, reuses them.")] = None,
    calib_samples: CalibSamples = QuantizeOptions.calib_samples,
    calib_seq_len: CalibSeqLen = QuantizeOptions.calib_seq_len,
    calib_dataset: CalibDataset = QuantizeOptions.calib_dataset,
    smooth_alpha: SmoothAlpha = QuantizeOptions.smooth_alpha,
    rotation_block: RotationBlock = QuantizeOptions.rotation_block,
    outlier_ratio: OutlierRatio = QuantizeOptions.outlier_ratio,
    device: Device = "auto",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    dtype: ComputeDtype = "auto",
    data_dir: DataDir = None,
    int8_head: Annotated[bool, typer.Option("--int8-head", help=INT8_HEAD_HELP)] = False,
    no_verify: NoVerify = False,
    trust_remote_code: TrustRemoteCode = False,
    quiet: Quiet = False,
) -> None:
    """Perplexity per method on WikiText-2, PTB, C4 or a file; JSON on stdout, a table on stderr.
    Under torchrun the windows are shared out between the processes and rank 0 reports."""
    console = stderr_console(quiet or not distributed.is_main())
    model = choose_model(model, console, models.DEFAULT_MODEL)
    chosen = parse_methods(methods)
    if bos not in ("window", "text"):
        raise DataError(f"--bos must be 'window' or 'text', got {bos!r}")
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}")
    placed, run_device = evaluation_placement(ctx, device, device_map, max_memory, offload_folder)
    if placed is not None and int8_head:
        raise InvalidArgumentError(INT8_HEAD_PLACED)
    text = data.load_text(dataset, data_dir)
    run_dtype = variants.resolve_dtype(dtype, run_device)
    with console.status(f"loading {model}"):
        calibration = QuantizeOptions(calib_samples=calib_samples, calib_seq_len=calib_seq_len, calib_dataset=calib_dataset, data_dir=data_dir, smooth_alpha=smooth_alpha,
                                      rotation_block=rotation_block, outlier_ratio=outlier_ratio, given=given_options(ctx))
        subject = variants.subject(model, chosen, threshold, run_dtype, run_device, verify=not no_verify, calibration=calibration, held_out=text.source,
                                   placement=placed)
    if int8_head:
        check_int8_head(subject.thresholds)  # the int8 methods that run, before any is evaluated
    for line in subject.warnings:
        warn(line)
    limit = models.context_length(subject.config)
    if limit is not None and seq_len > limit:
        raise DataError(f"--seq-len {seq_len} is longer than the model's context ({limit} tokens)")
    ids, bos_id = tokenize(subject.tokenizer, text.text, bos)
    windows = make_windows(ids, seq_len, stride, bos_id, max_tokens, text.source)
    distributed.agree({"the text's windows": windows.digest(), **variants.run_identity(subject, chosen, calibration)},
                      "another --dataset, --data-dir or LLMINT8_DATA_DIR, tokenizer, --seq-len or --max-tokens?")
    results, baseline = {}, None
    with progress_bar(console) as bar:
        for name, network in subject.variants:
            head = int8_head and name != variants.BASELINE
            if head:
                quantize_head(network)
            shown = int8_head_label(variants.shown_name(name, run_dtype), head)
            where = report_placement(bar.console, shown, network)
            task = bar.add_task(f"{shown:>14}", total=len(windows.input_ids))
            started = time.time()
            cache = WindowCache(variants.cache_folder(cache_dir, subject, name, run_dtype, run_device, head), windows) if cache_dir else None
            result = perplexity(network, windows, batch_size, lambda n, t=task: bar.advance(t, n), cache)
            seconds = time.time() - started
            baseline = result.ppl if name == variants.BASELINE else baseline
            results[name] = {
                "ppl": round(result.ppl, 4), "nll": round(result.nll, 4),
                "delta_pct": None if baseline is None else round(100 * (result.ppl / baseline - 1), 3),
                "seconds": round(seconds, 2), "tokens_per_s": computed_rate(result, seconds),
                "calibration": subject.calibration_of(name), **subject.settings_of(name), **({"int8_head": True} if head else {}),
                **({"reused_windows": result.reused} if cache else {}), **({"placement": where} if where else {}),
                **({} if math.isfinite(result.ppl) else {"error": NOT_FINITE}),
            }
            bar.remove_task(task)
            bar.console.print(f"{shown:>14}: ppl {result.ppl:.3f} in {seconds:.0f} s")  # a line per method: logs of long runs show progress
            del network
    document = {
        "dataset": {"name": text.name, "source": text.source, "sample": text.sample, **({"note": text.note} if text.note else {})},
        "protocol": {
            "seq_len": seq_len, "stride": stride or windows.input_ids.shape[1] - windows.bos_per_window,
            "bos": bos, "bos_per_window": windows.bos_per_window, "max_tokens": max_tokens,
            "windows": len(windows.input_ids), "scored_tokens": windows.scored_tokens,
        },
        "thresholds": subject.thresholds, "device": str(run_device), "dtype": str(run_dtype).removeprefix("torch."), "processes": distributed.world_size(),
        "results": results, "notes": subject.notes, "parameters": subject.parameters,
    }
    cells = [[
        int8_head_label(variants.shown_name(name, run_dtype), bool(row.get("int8_head"))), f"{row['ppl']:.3f}", "" if row["delta_pct"] is None else f"{row['delta_pct']:+.2f} %",
        f"{row['seconds']:.1f}", "cached" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:.0f}",
    ] for name, row in results.items()]
    document["int8_gemm"] = gemm_report()
    distributed.finish()
    if not distributed.is_main():
        return
    title = f"perplexity · {subject.label} · {text.name}{' (sample)' if text.sample else ''} · {windows.scored_tokens} tokens"
    print_table(console, title, ["method", "ppl", "Δ vs 16-bit", "s", "tok/s"], cells, ("s",))
    console.print(variants.calibration_line(subject))
    emit_json("eval-ppl", model, document)
    broken = [name for name, row in results.items() if "error" in row]
    if broken:
        fail(f"perplexity of {', '.join(broken)} is not finite: {NOT_FINITE}", EXIT_NOT_FINITE)
