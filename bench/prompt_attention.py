"""A prompt's attention through llmint8's kernel (`llmint8_cpu::prompt_attention`) and through torch's
SDPA (its CPU flash attention), bf16, on real models' head shapes: speed, and how far each is from
float64 on the same inputs.

    python bench/prompt_attention.py [--shapes smollm2-135m,llama-3.2-1b,llama-3-8b] [--lengths 128,512,2048]
                                     [--batch 1] [--padded] [--rounds 7] [--threads 2]

`--padded`: under transformers' boolean mask of a batch whose sequence b starts after 7 b pad tokens
(the kernel's masked path) instead of is_causal. Prints JSON: per shape and length the median ms of
each, the ratio, the largest error against float64 of each, the machine.
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {"smollm2-135m": (9, 3, 64), "llama-3.2-1b": (32, 8, 64), "llama-3-8b": (32, 8, 128)}  # query heads, key/value heads, head dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--lengths", default="128,512,2048")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--padded", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from llmint8_cli.evaluation.speed import machine
    from llmint8_cli.nn import attention

    if not attention.native_attention_here():
        raise SystemExit("prompt_attention: this CPU has no AVX512-BF16 (or the native kernels did not build)")
    torch.set_num_threads(args.threads)
    results = {}
    for shape in args.shapes.split(","):
        heads, kv_heads, dim = SHAPES[shape]
        for length in (int(n) for n in args.lengths.split(",")):
            g = torch.Generator().manual_seed(length)
            q = torch.randn(args.batch, length, heads, dim, generator=g).bfloat16().transpose(1, 2)
            kv = torch.randn(args.batch, length, 2 * kv_heads, dim, generator=g).bfloat16().transpose(1, 2)
            k, v = kv[:, :kv_heads], kv[:, kv_heads:]
            rows, cols = torch.arange(length)[:, None], torch.arange(length)[None, :]
            mask = ((rows >= cols) & (cols >= 7 * torch.arange(args.batch)[:, None, None, None])) if args.padded else None
            scale = 1 / math.sqrt(dim)
            calls = {"llmint8": lambda: torch.ops.llmint8_cpu.prompt_attention(q, k, v, mask, scale),
                     "torch sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True).transpose(1, 2)}
            group = heads // kv_heads
            exact = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1), attn_mask=mask,
                                                   is_causal=mask is None, scale=scale).transpose(1, 2)
            times = {name: [] for name in calls}
            with torch.inference_mode():
                errors = {name: float((call().double() - exact).abs().max()) for name, call in calls.items()}
                for turn in range(args.rounds + 1):  # the first turn warms up
                    for name, call in calls.items():
                        started = time.perf_counter()
                        call()
                        if turn:
                            times[name].append((time.perf_counter() - started) * 1e3)
            ms = {name: round(statistics.median(v), 3) for name, v in times.items()}
            results[f"{shape} {length}"] = {"ms": ms, "torch / llmint8": round(ms["torch sdpa"] / ms["llmint8"], 2), "max_error_vs_float64": errors}
    print(json.dumps({"batch": args.batch, "padded": args.padded, "threads": args.threads, "results": results, "machine": machine()}, indent=1))


if __name__ == "__main__":
    main()
