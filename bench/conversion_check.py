"""How far healthy conversions stay inside the conversion check's tolerance (llmint8_cli/nn/check.py).

For one model, every 8-bit method is calibrated as `quantize` calibrates it (on fewer windows),
converted in memory and checked on the calibration text's first 64 tokens; per method, the block
that comes closest to the tolerance (its error minus EXPLAINED_FACTOR times what its layers
explain: the check refuses above ROUNDING_ERROR), the logits' relative error against the 16-bit
model, top-1 agreement, and the check's seconds. JSON lines on stdout.

    python bench/conversion_check.py smollm2-135m [--samples 4]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from llmint8_cli import models
from llmint8_cli.checkpoint.quantize import QuantizeOptions, calibrate, check_ids
from llmint8_cli.core.methods import METHODS
from llmint8_cli.nn.check import EXPLAINED_FACTOR, ROUNDING_ERROR, ConversionCheck, originals_in
from llmint8_cli.nn.convert import quantizable_layers, quantize_model
from llmint8_cli.nn.experts import unfuse_experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--samples", type=int, default=4, help="calibration windows of 128 tokens")
    args = parser.parse_args()
    source = models.resolve(args.model)
    base = models.load_model(source, dtype=torch.float32)
    unfuse_experts(base)
    tokenizer = models.load_tokenizer(source)
    options = QuantizeOptions(calib_samples=args.samples, calib_seq_len=128)
    stats, _ = calibrate(base, None, [name for name, _ in quantizable_layers(base)], tokenizer, options)
    ids, _ = check_ids(base, tokenizer, options)
    for name, method in METHODS.items():
        if not method.quantized:
            continue
        converted = quantize_model(copy.deepcopy(base), name, outliers=stats.outlier_columns(method.threshold_or_default(None)), input_max=stats.col_max)
        check = ConversionCheck(converted, originals_in(base, converted))
        started = time.perf_counter()
        report = check.run(ids)
        seconds = time.perf_counter() - started
        closest = max(check.block_errors, key=lambda entry: entry["error"] - EXPLAINED_FACTOR * entry["explained"])
        print(json.dumps({
            "model": args.model, "method": name, "closest_block": closest,
            "margin_left": round(ROUNDING_ERROR - (closest["error"] - EXPLAINED_FACTOR * closest["explained"]), 4),
            "logits_relative_error": report["logits_relative_error"], "top1_agreement": report["top1_agreement"], "seconds": round(seconds, 2),
        }), flush=True)


if __name__ == "__main__":
    main()
