"""bf16 perplexity of a 16-bit model and its llmint8 folder with transformers' SDPA and with
llmint8's prompt attention (`llmint8_sdpa`), the demo's protocol (WikiText-2, 512-token windows, a
BOS each, batch 4): whether the kernel moves an evaluation, and how much faster it runs.

    python bench/attention_perplexity_ab.py FOLDER [--model smollm2-135m] [--max-tokens 10240] [--threads 2]

FOLDER is an llmint8 folder of --model (e.g. `make demo`'s out/smollm2-135m-int8). Prints JSON:
perplexity and seconds of each model with each attention, the machine.
"""

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=10240)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import llmint8_cli
    from llmint8_cli import data, models
    from llmint8_cli.evaluation import perplexity
    from llmint8_cli.evaluation.speed import machine
    from llmint8_cli.nn import attention

    torch.set_num_threads(args.threads)
    source = models.resolve(args.model)
    ids, bos = perplexity.tokenize(models.load_tokenizer(source), data.load_text("wikitext2").text, "window")
    windows = perplexity.make_windows(ids, 512, bos_id=bos, max_tokens=args.max_tokens)
    results = {}
    for name, model in (("bf16", models.load_model(source, dtype=torch.bfloat16)), ("llmint8 folder", llmint8_cli.load(args.folder, dtype=torch.bfloat16))):
        for implementation in ("sdpa", attention.NAME):
            model.set_attn_implementation(implementation)
            started = time.perf_counter()
            result = perplexity.perplexity(model, windows, batch_size=4)
            results[f"{name}, {implementation}"] = {"ppl": round(result.ppl, 4), "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps({"model": args.model, "folder": args.folder, "tokens": windows.scored_tokens, "results": results, "machine": machine()}, indent=1))


if __name__ == "__main__":
    main()
