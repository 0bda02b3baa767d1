"""Fidelity where LLM.int8() is needed: every method on models with planted outlier features (issue #47).

    python bench/planted_outliers.py MODEL OUT [--dims 1,4,10] [--magnitudes 10,30,100] [--places attention,mlp,both]
        [--methods all] [--max-tokens 10240] [--seq-len 512] [--seed 0] [--eval-args "--outlier-ratio 16"]
    python bench/planted_outliers.py smollm2-135m bench/results/planted-smollm2 --dims 4 --magnitudes 10,30,100 --places both

For each grid point the model is planted (llmint8_cli/evaluation/planted.py: in every decoder
layer the same `dims` hidden dimensions of the attention and/or MLP inputs scaled by the
magnitude, the reading linears' columns divided by it: the same function in 16-bit), saved in
fp32, and evaluated by one `llmint8 eval-ppl` run with every method (the demo slice by default:
WikiText-2 test, 10,240 tokens in windows of 512). The unplanted model is the grid's first row.
Each point's JSON is appended to OUT/points.jsonl as it finishes (a rerun skips the points done);
OUT/table.md and OUT/ppl-vs-magnitude.png are rewritten from all of them at the end. The 16-bit
column shows that planting kept the function: its perplexity must equal the unplanted one's.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from llmint8_cli import models
from llmint8_cli.cli.bench import parse_ints
from llmint8_cli.evaluation.planted import PLACES, chosen_dims, plant


def planted_folder(spec: str, dims: int, magnitude: float, place: str, seed: int, where: Path) -> Path:
    """The model with its features planted, saved in fp32 with its tokenizer (dims 0: as it is)."""
    source = models.resolve(spec)
    model = models.load_model(source, dtype=torch.float32)
    if dims:
        plant(model, chosen_dims(model.config.hidden_size, dims, seed), magnitude, place)
    if source.kind == "gguf":  # expanded to fp32 at load; transformers refuses to save a model it calls GGUF-quantized
        model.hf_quantizer = None
        del model.config.quantization_config
    model.save_pretrained(where)
    models.load_tokenizer(source).save_pretrained(where)
    return where


def evaluate(folder: Path, args) -> dict:
    command = [sys.executable, "-m", "llmint8_cli", "eval-ppl", str(folder), "--dataset", args.dataset, "--seq-len", str(args.seq_len),
               "--max-tokens", str(args.max_tokens), "--batch-size", "4", "--methods", args.methods, *shlex.split(args.eval_args), "-q"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode not in (0, 3):  # 3: a method's perplexity is not finite, a finding the JSON holds
        raise SystemExit(f"eval-ppl failed on {folder}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def grid(args) -> list[tuple[int, float, str]]:
    points = [(0, 1.0, "none")]
    points += [(d, float(m), p) for p in args.places.split(",") for d in parse_ints(args.dims, "--dims") for m in parse_ints(args.magnitudes, "--magnitudes")]
    for _, _, place in points[1:]:
        if place not in PLACES:
            raise SystemExit(f"--places: {place!r} is not one of {', '.join(PLACES)}")
    return points


def key(point: dict) -> tuple:
    return point["dims"], point["magnitude"], point["place"]


def cell(result: dict) -> str:
    """A method's perplexity change, with the columns its calibration stored (and those its outlier ratio added)."""
    if result.get("delta_pct") is None:
        return "n/a"
    calibration = result.get("calibration") or {}
    stored = calibration.get("outlier_columns_total")
    added = f", {calibration['systematic_columns']} by ratio" if calibration.get("systematic_columns") else ""
    return f"{result['delta_pct']:+.2f}" + (f" ({stored}{added})" if stored is not None else "")


def write_table(out: Path, points: list[dict]) -> None:
    methods = [m for m in points[0]["results"] if m != "fp16"]
    base = points[0]["results"]["fp16"]["ppl"]
    lines = [f"# Planted outlier features: {points[0]['model']}, {points[0]['tokens']} tokens of {points[0]['dataset']}", "",
             "perplexity change against the planted model's 16-bit perplexity (%), and for calibrated methods the 16-bit columns they store (of which systematic "
             "features added by their outlier ratio); 16-bit: that perplexity, and its change against the unplanted model", "",
             "| place | dims | magnitude | 16-bit | " + " | ".join(methods) + " |", "| --- | --- | --- | --- | " + " | ".join("---" for _ in methods) + " |"]
    for p in sorted(points, key=lambda p: (p["place"] != "none", p["place"], p["dims"], p["magnitude"])):
        fp = p["results"]["fp16"]["ppl"]
        cells = [cell(p["results"][m]) for m in methods]
        lines.append(f"| {p['place']} | {p['dims']} | {p['magnitude']:g} | {fp:.4f} ({100 * (fp / base - 1):+.3f} %) | " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")


def write_plot(out: Path, points: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install -e '.[plot]'): no picture", file=sys.stderr)
        return
    planted = [p for p in points if p["dims"]]
    panels = sorted({(p["place"], p["dims"]) for p in planted})
    methods = [m for m in points[0]["results"] if m != "fp16"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, (place, dims) in zip(axes[0], panels):
        chosen = sorted((p for p in planted if (p["place"], p["dims"]) == (place, dims)), key=lambda p: p["magnitude"])
        for method in methods:
            ax.plot([p["magnitude"] for p in chosen], [p["results"][method].get("delta_pct") for p in chosen], marker="o", label=method)
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set(title=f"{place}, {dims} dim{'s' * (dims > 1)}", xlabel="planted magnitude (x)", xscale="log")
        ax.set_yscale("symlog", linthresh=1.0)  # linear within ±1 %, where the methods that matter are; a collapse stays on the plot
    low, high = ax.get_ylim()  # shared by the panels: from at least -0.5 % to +1 %, so that 0 and the +0.5 % line have ticks around them
    ax.set_ylim(min(low, -0.5), max(high, 1.0))
    axes[0][0].set_ylabel("perplexity change vs 16-bit (%)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{points[0]['model']}: planted outlier features")
    fig.tight_layout()
    fig.savefig(out / "ppl-vs-magnitude.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("out", type=Path)
    parser.add_argument("--dims", default="1,4,10")
    parser.add_argument("--magnitudes", default="10,30,100")
    parser.add_argument("--places", default="attention,mlp,both")
    parser.add_argument("--methods", default="all")
    parser.add_argument("--dataset", default="wikitext2")
    parser.add_argument("--max-tokens", type=int, default=10240)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-args", default="", help="more eval-ppl options for every point, e.g. '--outlier-ratio 16'")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "points.jsonl"
    done = {key(p): p for p in map(json.loads, log.read_text().splitlines())} if log.is_file() else {}
    for dims, magnitude, place in grid(args):
        if (dims, magnitude, place) in done:
            continue
        scratch = Path(tempfile.mkdtemp(prefix="llmint8-planted-"))
        try:
            document = evaluate(planted_folder(args.model, dims, magnitude, place, args.seed, scratch / "model"), args)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        point = {"model": args.model, "dims": dims, "magnitude": magnitude, "place": place, "seed": args.seed, "dataset": args.dataset, "eval_args": args.eval_args,
                 "tokens": document["protocol"]["scored_tokens"], "results": document["results"], "notes": document["notes"]}
        with log.open("a") as handle:
            handle.write(json.dumps(point) + "\n")
        done[key(point)] = point
        summary = ", ".join(f"{m} {r['delta_pct']:+.2f} %" for m, r in document["results"].items() if r.get("delta_pct") is not None and m != "fp16")
        print(f"{place} dims={dims} x{magnitude:g}: 16-bit {document['results']['fp16']['ppl']:.4f}; {summary}", file=sys.stderr, flush=True)
    points = list(done.values())
    write_table(args.out, points)
    write_plot(args.out, points)


if __name__ == "__main__":
    main()
