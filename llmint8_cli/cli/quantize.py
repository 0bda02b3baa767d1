"""llmint8 quantize SRC OUT"""

from __future__ import annotations

from typing import Annotated

import typer

from llmint8_cli.checkpoint.quantize import QuantizeOptions, quantize_checkpoint
from llmint8_cli.checkpoint.output import parse_size
from llmint8_cli.cli.common import CalibDataset, CalibSamples, CalibSeqLen, DataDir, OutlierRatio, RotationBlock, SmoothAlpha, Quiet, TrustRemoteCode, Threshold, command, emit_json, given_options, progress_bar, stderr_console, warn
from llmint8_cli.core.methods import DEFAULT_METHOD, METHODS
from llmint8_cli.nn.convert import kept_line


@command
def quantize(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(help="Model folder (safetensors or .bin; a bitsandbytes 8-bit folder converts without re-rounding), .gguf file, alias (smollm2-135m, gemma3-270m), short name (opt-1.3b) or Hub id.")],
    out: Annotated[str, typer.Argument(help="Output folder (written atomically).")],
    method: Annotated[str, typer.Option(help=f"One of: {', '.join(m for m in METHODS if m != 'fp16')}.")] = DEFAULT_METHOD,
    threshold: Threshold = None,
    dtype: Annotated[str, typer.Option(help="dtype of the unquantized tensors: fp16, bf16, auto (the source's; fp32 -> fp16), or fp32 (twice the size of fp16).")] = "auto",
    skip: Annotated[list[str] | None, typer.Option(help="Glob of module names to keep 16-bit (repeatable), e.g. '*.mlp.down_proj'.")] = None,
    calib_samples: CalibSamples = QuantizeOptions.calib_samples,
    calib_seq_len: CalibSeqLen = QuantizeOptions.calib_seq_len,
    calib_dataset: CalibDataset = QuantizeOptions.calib_dataset,
    smooth_alpha: SmoothAlpha = QuantizeOptions.smooth_alpha,
    rotation_block: RotationBlock = QuantizeOptions.rotation_block,
    outlier_ratio: OutlierRatio = QuantizeOptions.outlier_ratio,
    data_dir: DataDir = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard, e.g. 2GB.")] = "2GB",
    clamp_overflow: Annotated[bool, typer.Option("--clamp-overflow", help="Clamp finite weights beyond the 16-bit range (with a warning) instead of refusing them.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it is an earlier llmint8 output or an empty folder.")] = False,
    trust_remote_code: TrustRemoteCode = False,
    quiet: Quiet = False,
) -> None:
    """Convert a 16-bit causal LM to the llmint8 int8 format; prints a JSON summary."""
    options = QuantizeOptions(
        method=method, threshold=threshold, dtype=dtype, skip=list(skip or []), calib_samples=calib_samples,
        calib_seq_len=calib_seq_len, calib_dataset=calib_dataset, max_shard_bytes=parse_size(max_shard_size), data_dir=data_dir,
        clamp_overflow=clamp_overflow, smooth_alpha=smooth_alpha, rotation_block=rotation_block, outlier_ratio=outlier_ratio, given=given_options(ctx),
    )
    console = stderr_console(quiet)
    bar = progress_bar(console)
    tasks = {}
    stages = {"calibrate": ("calibrating outlier columns (windows)", 1), "write": ("writing int8 shards (MiB)", 2**20)}

    def report(stage: str, done: int, total: int) -> None:
        description, unit = stages[stage]
        if not tasks:  # started only once the inputs are accepted: an error stays one line
            bar.start()
        if stage not in tasks:
            tasks[stage] = bar.add_task(description, total=max(total // unit, 1))
        bar.update(tasks[stage], completed=done // unit)

    try:
        summary = quantize_checkpoint(src, out, options, force=force, progress=report)
    finally:
        if tasks:  # a bar never started would still print an empty line
            bar.stop()
    if summary.get("parameters") and kept_line(summary["parameters"]):
        warn(kept_line(summary["parameters"]))
    if summary["clamped_tensors"]:
        warn(f"clamped to the {summary['dtype']} range: {', '.join(summary['clamped_tensors'])}")
    if summary.get("from") == "bitsandbytes":
        console.print(f"[green]done[/] {summary['size_bytes'] / 2**20:.1f} MiB, {summary['quantized_layers']} layers converted from bitsandbytes (int8 rows kept)")
    else:
        console.print(
            f"[green]done[/] {summary['size_bytes'] / 2**20:.1f} MiB, {summary['ratio_vs_fp16']:.3f}x of fp16, "
            f"{summary['outlier_columns_total']} stored outlier columns, {summary['seconds']:.1f}s; checked on {summary['check']['tokens']} tokens: "
            f"logits within {summary['check']['logits_relative_error']:.1%} of the 16-bit model's, top-1 agreement {summary['check']['top1_agreement']:.0%}"
        )
    emit_json("quantize", summary["output"], summary)
