"""llmint8 bench [MODEL]: layer speed (the paper's Table 5 shapes) or end-to-end model speed."""

from __future__ import annotations

import datetime
from typing import Annotated

import typer
from rich.table import Table

from llmint8_cli.cli.common import Device, NoVerify, Quiet, command, emit_json, progress_bar, stderr_console
from llmint8_cli.core.methods import DEFAULT_METHOD, DEFAULT_THRESHOLD, get_method
from llmint8_cli.errors import InvalidArgumentError
from llmint8_cli.evaluation import speed, variants


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


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InvalidArgumentError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise InvalidArgumentError(f"{option}: expected non-negative integers, got {text!r}")
    return values


@command
def bench(
    model: Annotated[str | None, typer.Argument(help="Model mode: a 16-bit model (quantized on the fly) or an llmint8 folder. Omit for layer mode.")] = None,
    shapes: Annotated[str, typer.Option(help="Layer mode: OUTxIN weight shapes, comma-separated, or 'paper' (Table 5: 4d x d for eight d).")] = "4096x4096",
    tokens: Annotated[str, typer.Option(help="Layer mode: token counts m per call.")] = "1,16,128,512,2048",
    outlier_cols: Annotated[str, typer.Option(help="Layer mode: outlier feature columns for the llm.int8 rows.")] = "0,6,64",
    method: Annotated[str, typer.Option(help="Model mode: quantization method.")] = DEFAULT_METHOD,
    prompt_tokens: Annotated[int, typer.Option(min=1, help="Model mode: prefill length.")] = 128,
    new_tokens: Annotated[int, typer.Option(min=1, help="Model mode: tokens decoded.")] = 32,
    batch: Annotated[int, typer.Option(min=1, help="Model mode: sequences prefilled and decoded together.")] = 1,
    repeat: Annotated[int, typer.Option(min=1, help="Timed calls per row (after one warm-up).")] = 5,
    device: Device = "cpu",
    no_verify: NoVerify = False,
    quiet: Quiet = False,
) -> None:
    """Time 16-bit versus int8 layers or models; JSON on stdout, a table on stderr."""
    console = stderr_console(quiet)
    run_device = variants.resolve_device(device)
    document = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": str(run_device), "machine": speed.machine()}
    if model is None:
        shape_list, token_list, outliers = parse_shapes(shapes), parse_ints(tokens, "--tokens"), parse_ints(outlier_cols, "--outlier-cols")
        rows = []
        with progress_bar(console) as bar:
            task = bar.add_task("layers", total=len(shape_list) * len(token_list) * (5 + len(outliers)))
            for out_f, in_f in shape_list:
                rows += speed.bench_layer(out_f, in_f, [t for t in token_list if t > 0], outliers, repeat, run_device, progress=lambda: bar.advance(task))
        document.update({"mode": "layer", "repeat": repeat, "rows": rows})
        table = Table(title=f"llmint8 bench · layers · {document['machine']['cpu_int8_gemm']} · {run_device}")
        for column in ("shape", "m", "row", "median ms", "min–max ms", "× 16-bit", "rel. err", "weight MiB"):
            table.add_column(column, justify="right")
        for r in rows:
            table.add_row(r["shape"], str(r["tokens"]), r["row"], f"{r['median_ms']:.3f}", f"{r['min_ms']:.2f}–{r['max_ms']:.2f}", f"{r['speedup_vs_16bit']:.2f}", f"{r['rel_error_vs_fp32']:.1e}", f"{r['weight_mib']:.1f}")
    else:
        dtype = variants.resolve_dtype("bf16" if run_device.type == "cpu" else "fp16", run_device)
        subject = variants.subject(model, [get_method(method)], DEFAULT_THRESHOLD, dtype, run_device, verify=not no_verify)
        results = {}
        with console.status("timing prefill and decode"):
            for name, network in subject.variants:
                results[name] = speed.bench_model(network, prompt_tokens, new_tokens, repeat, run_device, batch)
        base = results.get(variants.BASELINE)
        for name, row in results.items():
            if base:
                row["prefill_speedup"] = round(row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"], 3)
                row["decode_speedup"] = round(row["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3)
                row["weight_ratio"] = round(row["weight_mib"] / base["weight_mib"], 3)
        document.update({"mode": "model", "model": subject.label, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeat": repeat, "results": results})
        table = Table(title=f"llmint8 bench · {subject.label} · batch {batch} · {run_device}")
        for column in ("variant", "prefill tok/s", "decode tok/s", "weights MiB", "× prefill", "× decode"):
            table.add_column(column, justify="right")
        for name, r in results.items():
            table.add_row(name, f"{r['prefill_tokens_per_s']:.0f}", f"{r['decode_tokens_per_s']:.1f}", f"{r['weight_mib']:.0f}", str(r.get("prefill_speedup", "")), str(r.get("decode_speedup", "")))
    console.print(table)
    emit_json(document)

