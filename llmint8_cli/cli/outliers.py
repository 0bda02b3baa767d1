"""llmint8 outliers MODEL: the emergent outlier features of a model (paper §4)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import torch
import typer

from llmint8_cli import activations, data, models, placement
from llmint8_cli.cli.common import (
    PIPED_MODEL_HELP, DataDir, DeviceMap, MaxMemory, OffloadFolder, Quiet, TrustRemoteCode, choose_model, command, emit_json, print_table, report_placement, stderr_console,
)
from llmint8_cli.checkpoint.quantize import calibrated_columns
from llmint8_cli.core.methods import DEFAULT_THRESHOLD, METHODS, ROTATE_OUTLIER_RATIO, check_outlier_ratio, check_threshold
from llmint8_cli.errors import InvalidArgumentError, OutputExistsError
from llmint8_cli.evaluation.perplexity import make_windows, tokenize
from llmint8_cli.nn.convert import as_linear, quantizable_layers


def plot(report: dict, stats: activations.ActivationStats, layer_names: list[str], path: Path, title: str) -> None:
    """Heat map (layers x hidden dims, max |x|) and the share of layers/positions per feature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    readers = set(stats.hidden_state_layers())
    hidden = [n for n in layer_names if n in readers]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8), gridspec_kw={"height_ratios": [3, 2]})
    if hidden:
        grid = torch.stack([stats.col_max[n] for n in hidden]).clamp(max=4 * report["threshold"]).numpy()
        image = top.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma")
        fig.colorbar(image, ax=top, label="max |x| (clipped at 4x threshold)")
    top.set_xlabel("hidden feature dimension")
    top.set_ylabel("linear layer (hidden-state input), in depth order")
    top.set_title(f"{title}: largest input magnitude per feature")
    features = report["features"][:40]
    xs = range(len(features))
    bottom.bar([x - 0.2 for x in xs], [100 * f["layer_share"] for f in features], width=0.4, label="% of layers")
    bottom.bar([x + 0.2 for x in xs], [100 * f["position_share"] for f in features], width=0.4, label="% of positions")
    bottom.axhline(100 * report["criteria"]["layer_share"], color="C0", linestyle="--", linewidth=0.8)
    bottom.axhline(100 * report["criteria"]["position_share"], color="C1", linestyle="--", linewidth=0.8)
    bottom.set_xticks(list(xs), [str(f["dim"]) for f in features], rotation=90, fontsize=7)
    bottom.set_xlabel("feature dimension (most widespread first); dashed: systematic criteria 25 % / 6 %")
    bottom.set_ylabel("% affected")
    bottom.legend()
    fig.tight_layout()
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(partial, dpi=110, format="png")
        partial.replace(path)  # a PNG appears whole or not at all
    finally:
        partial.unlink(missing_ok=True)
        plt.close(fig)


def stored_by_methods(stats: activations.ActivationStats) -> list[dict]:
    """What the decomposition methods at their defaults would store from these statistics, one
    entry per (threshold, ratio) with the methods that use it: why a method chose what it chose."""
    chosen: dict[tuple[float, float], dict] = {}
    for method in (m for m in METHODS.values() if m.decomposition):
        setting = method.threshold_or_default(None), method.outlier_ratio_or_default(None)
        if setting not in chosen:
            columns, info = calibrated_columns(stats, *setting)
            chosen[setting] = {"methods": [], "threshold": setting[0], "outlier_ratio": setting[1], "columns": sum(int(c.numel()) for c in columns.values()),
                               "systematic_columns": info.get("systematic_columns", 0)}
        chosen[setting]["methods"].append(method.name)
    return list(chosen.values())


def check_plot_path(path: Path, force: bool) -> None:
    """Before the analysis runs (minutes): the picture can be written where asked, and replaces nothing without --force."""
    if path.suffix.lower() != ".png":
        raise InvalidArgumentError(f"--plot must name a .png file, got {path}")
    folder = path.parent
    if not folder.is_dir():
        raise InvalidArgumentError(f"--plot {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"--plot {path}: the folder {folder} is not writable")
    if path.is_dir():
        raise InvalidArgumentError(f"--plot {path} is a folder")
    if os.path.lexists(path) and not force:
        raise OutputExistsError(f"--plot {path} exists already; pass --force to replace it")


@command
def outliers(
    model: Annotated[str | None, typer.Argument(help=f"A 16-bit model: folder, .gguf, alias, short name or Hub id. {PIPED_MODEL_HELP}, else the default model.", show_default=False)] = None,
    dataset: Annotated[str, typer.Option(help="wikitext2, ptb, c4 or a text/.jsonl path.")] = "wikitext2",
    samples: Annotated[int, typer.Option(min=1, help="Sequences to run.")] = 8,
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens per sequence.")] = 512,
    threshold: Annotated[float, typer.Option(help="Outlier magnitude (paper: 6.0).")] = DEFAULT_THRESHOLD,
    outlier_ratio: Annotated[float, typer.Option(help="Also call a feature systematic when it stands this many times above its layers' median column max "
                                                      "in 25 % of them or more, whatever its size (the calibration's criterion; llm.int8-rotate's default).")] = ROTATE_OUTLIER_RATIO,
    plot_path: Annotated[Path | None, typer.Option("--plot", help="Write a PNG: heat map and share of layers/positions per feature.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --plot file.")] = False,
    data_dir: DataDir = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    trust_remote_code: TrustRemoteCode = False,
    quiet: Quiet = False,
) -> None:
    """Per-layer outlier columns, systematic outlier features and what the decomposition keeps in 16-bit."""
    console = stderr_console(quiet)
    model = choose_model(model, console, models.DEFAULT_MODEL)
    check_threshold(threshold)
    check_outlier_ratio(outlier_ratio)
    if plot_path is not None:
        check_plot_path(plot_path, force)
    placed = placement.parse(device_map, max_memory, offload_folder)
    text = data.load_text(dataset, data_dir)
    source = models.resolve(model)
    with console.status(f"loading {model}"):
        tokenizer = models.load_tokenizer(source)
        network = models.load_model(source, dtype=torch.float32, placement=placed)
    where = report_placement(console, source.label, network)
    ids, bos_id = tokenize(tokenizer, text.text[: 16 * samples * seq_len], "window")
    windows = make_windows(ids, seq_len, bos_id=bos_id, source=text.source).input_ids[:samples]
    layers = dict(quantizable_layers(network))
    shapes = {n: tuple(as_linear(m).weight.shape) for n, m in layers.items()}
    with console.status(f"running {len(windows)} sequences of {seq_len} tokens"):
        stats = activations.collect(network, windows.split(1), list(layers), threshold)
    report = activations.analyze(stats, shapes, outlier_ratio)
    report.update({"dataset": text.name, "samples": len(windows), "seq_len": seq_len, **({"placement": where} if where else {})})
    if plot_path is not None:
        plot(report, stats, list(layers), plot_path, source.label)
        report["plot"] = str(plot_path)
    report["stored_columns"] = stored_by_methods(stats)
    cells = [[str(f["dim"]), f"{100 * f['layer_share']:.1f}", f"{100 * f['position_share']:.2f}", f"{f['max_abs']:.1f}", "yes" if f["systematic"] else "",
              f"{f['times_median']:.0f}", f"{100 * f['standing_share']:.1f}", "yes" if f["systematic_by_ratio"] else ""] for f in report["features"][:15]]
    print_table(console, f"outlier features · {source.label} · |x| >= {threshold}",
                ["dim", "% layers", "% positions", "max |x|", "systematic", "x median", f"% layers >= {outlier_ratio:g}x", "by ratio"], cells)
    console.print(
        f"systematic features: {report['systematic_features']} (by the ratio {outlier_ratio:g}: {report['systematic_by_ratio']}) · 16-bit share: "
        f"{100 * report['activation_share_16bit']:.3f} % of activations, {100 * report['parameter_share_16bit']:.3f} % of parameters · "
        f"outlier columns: attention {report['outlier_columns_by_kind']['attention']}, FFN {report['outlier_columns_by_kind']['ffn']}"
    )
    console.print("calibrated on these sequences, the methods would store: " + "; ".join(
        f"{', '.join(s['methods'])} {s['columns']} columns (threshold {s['threshold']:g}" + (f", ratio {s['outlier_ratio']:g}: {s['systematic_columns']} of them" if s["outlier_ratio"] else "") + ")"
        for s in report["stored_columns"]))
    emit_json("outliers", model, report)
