"""One call of the LM head, in int8 (`--int8-head`) and in 16 bits, on the hidden states a real prompt
gives it (run-time outlier columns included), from a cold cache as inside a model's step.

    python bench/int8_head_call.py FOLDER [--rows 1,8,128,512] [--rounds 7] [--threads 2]

FOLDER is an llmint8 folder (e.g. `llmint8 quantize smollm2-135m /tmp/s-int8`). For a row count of
at most 8 the rows are that many decoded sequences (one token each, each with its own outlier
columns); above it, one prompt. A 96 MB buffer is written before each call (weights leave L3).
Prints JSON: the median ms of each head per row count, the outlier columns the rows hold, the machine.
"""

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--rows", default="1,8,128,512")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import llmint8_cli
    from llmint8_cli.evaluation.speed import machine
    from llmint8_cli.nn.convert import quantize_head

    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    model = llmint8_cli.load(args.folder, dtype=torch.bfloat16)
    head_16bit = model.get_output_embeddings().weight
    model = quantize_head(model)
    seen = {}
    model.get_output_embeddings().register_forward_pre_hook(lambda module, a: seen.__setitem__("x", a[0]))
    with torch.inference_mode():
        model(input_ids=torch.randint(5, 10000, (1, max(rows) + 8), generator=torch.Generator().manual_seed(0)))
    hidden = seen["x"][0]
    evict = torch.ones(96 * 2**20, dtype=torch.uint8)
    results = {}
    with torch.inference_mode():
        for count in rows:
            x = hidden[8 : 8 + count].reshape(count, 1, -1) if count <= 8 else hidden[:count].reshape(1, count, -1)
            calls = {"int8 head": lambda x=x: model.get_output_embeddings()(x), "16-bit head": lambda x=x: torch.nn.functional.linear(x, head_16bit)}
            times = {name: [] for name in calls}
            for turn in range(args.rounds + 1):  # the first turn warms up
                for name, call in calls.items():
                    evict.add_(1)
                    started = time.perf_counter()
                    call()
                    if turn:
                        times[name].append((time.perf_counter() - started) * 1e3)
            results[str(count)] = {"outlier_columns": int((x.abs() >= 6).any(dim=-2).sum(dim=-1).max()), **{name: round(statistics.median(v), 2) for name, v in times.items()}}
    print(json.dumps({"folder": args.folder, "threads": args.threads, "ms": results, "machine": machine()}, indent=1))


if __name__ == "__main__":
    main()
