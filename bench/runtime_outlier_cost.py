"""What an outlier column costs when calibration did not store it (issue #27), and what storing more costs.

A column whose activations reach the threshold in a sequence goes through 16-bit. If calibration
stored it, its weights are exact; if not, they come from the int8 rows (bitsandbytes' design, and
llmint8's). This script evaluates llm.int8 on the same windows in these variants:

  runtime / dequantized     no calibration, every outlier column's W from the int8 rows
  runtime / exact           no calibration, the exact W for them (needs all of W in 16-bit as well)
  calibN / dequantized      quantize's calibration with N windows, missed columns from the int8 rows
  calibN / exact            the same with the missed columns exact: the bound of any design for them

and counts, over every layer call, the columns taken to 16-bit and those among them not stored.
The "exact" variants keep a 16-bit copy of every weight: 2 bytes a parameter on top of the int8
one, the memory the paper's method exists to save. Stored columns cost 2 bytes x out_features each.

    python bench/runtime_outlier_cost.py MODEL [--dataset wikitext2] [--seq-len 512] [--windows 40] [--calib 32,128]

Prints one JSON document. Runs the reference (torch) path of the CPU backend for every variant,
which the parity suite holds equal to the native kernels, so that the columns can be counted.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import sys
import time
from unittest import mock

import torch

from llmint8_cli import data, models
from llmint8_cli.backends import cpu
from llmint8_cli.checkpoint.quantize import QuantizeOptions
from llmint8_cli.core import reference
from llmint8_cli.evaluation.perplexity import make_windows, perplexity, tokenize
from llmint8_cli.evaluation.variants import calibrate_on_the_fly
from llmint8_cli.nn.convert import as_linear, quantizable_layers, quantize_model
from llmint8_cli.nn.linear import Int8Linear

dequantized_columns = reference.outlier_weight_columns


class Counter:
    """Outlier columns met at run time, and those among them that were not stored."""

    def __init__(self):
        self.met = self.missed = 0


@contextlib.contextmanager
def reference_path(exact: dict[int, torch.Tensor] | None, counter: Counter):
    """The CPU backend without its native kernels; missed columns exact where `exact` has the layer's W."""

    def columns(qweight, fp_idx):
        stored = torch.isin(fp_idx, qweight.outlier_idx)
        counter.met += int(fp_idx.numel())
        counter.missed += int((~stored).sum())
        weight = None if exact is None else exact.get(qweight.int8.q.data_ptr())
        if weight is None:
            return dequantized_columns(qweight, fp_idx)
        return weight[:, fp_idx].float()

    with mock.patch.object(cpu, "native_kernels", lambda: None), mock.patch.object(reference, "outlier_weight_columns", columns):
        yield


def quantized(base, outliers: dict, keep_exact: bool):
    """(llm.int8 copy of base, {int8 weight's data_ptr: exact fp32 W} or None)."""
    model = copy.deepcopy(base)
    weights = {name: as_linear(module).weight.detach().float().clone() for name, module in quantizable_layers(model)} if keep_exact else None
    quantize_model(model, "llm.int8", outliers=outliers)
    if weights is None:
        return model, None
    return model, {module.weight.data_ptr(): weights[name] for name, module in model.named_modules() if isinstance(module, Int8Linear)}


def stored_bytes(model) -> int:
    return sum(m.outlier_weight.numel() * 2 for m in model.modules() if isinstance(m, Int8Linear))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--dataset", default="wikitext2")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--calib", default="32,128", help="calibration window counts, comma-separated")
    args = parser.parse_args()

    source = models.resolve(args.model)
    tokenizer = models.load_tokenizer(source)
    base = models.load_model(source, dtype=torch.float32)
    text = data.load_text(args.dataset, args.data_dir)
    ids, bos_id = tokenize(tokenizer, text.text, "window")
    windows = make_windows(ids, args.seq_len, bos_id=bos_id, max_tokens=args.windows * args.seq_len)
    windows = dataclasses.replace(windows, input_ids=windows.input_ids[: args.windows], labels=windows.labels[: args.windows])
    linear_params = sum(as_linear(m).weight.numel() for _, m in quantizable_layers(base))
    started = time.time()
    baseline = perplexity(base, windows).ppl
    rows = {"fp32": {"ppl": round(baseline, 4)}}
    plans = [("runtime", {}, {"samples": 0})]
    for count in (int(c) for c in args.calib.split(",") if c.strip()):
        stats, info = calibrate_on_the_fly(base, tokenizer, QuantizeOptions(calib_samples=count, data_dir=args.data_dir), text.source)
        outliers = stats.outlier_columns()
        plans.append((f"calib{count}", outliers, info))
    for label, outliers, info in plans:
        for mode in ("dequantized", "exact"):
            model, exact = quantized(base, outliers, mode == "exact")
            counter = Counter()
            with reference_path(exact, counter):
                ppl = perplexity(model, windows).ppl
            rows[f"{label} / {mode}"] = {
                "ppl": round(ppl, 4), "delta_pct": round(100 * (ppl / baseline - 1), 3),
                "stored_columns": sum(int(m.outlier_idx.numel()) for m in model.modules() if isinstance(m, Int8Linear)),
                "stored_column_bytes": stored_bytes(model), "extra_16bit_weight_bytes": linear_params * 2 if exact else 0,
                "columns_16bit_used": counter.met, "columns_16bit_not_stored": counter.missed,
                "calibration": {k: v for k, v in info.items() if k != "source"},
            }
            print(f"{label} / {mode}: ppl {ppl:.4f} ({rows[f'{label} / {mode}']['delta_pct']:+.3f} %), {counter.missed}/{counter.met} run-time columns not stored", file=sys.stderr)
    json.dump({
        "model": args.model, "dataset": text.name, "windows": len(windows.input_ids), "seq_len": args.seq_len,
        "scored_tokens": windows.scored_tokens, "int8_weight_bytes": linear_params, "seconds": round(time.time() - started, 1), "rows": rows,
    }, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
