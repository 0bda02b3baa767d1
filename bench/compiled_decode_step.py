"""One decode step of an llmint8 folder, eager against torch.compile (static KV cache, fullgraph,
llmint8's options: compilation.inductor_options), and where the compiled step's time goes (torch.profiler, by op).

    python bench/compiled_decode_step.py out/smollm2-135m-int8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    import llmint8_cli
    from llmint8_cli import compilation
    from llmint8_cli.evaluation.speed import machine
    from transformers import StaticCache

    torch.set_num_threads(args.threads)
    model = llmint8_cli.load(args.folder, dtype=getattr(torch, args.dtype))
    cache = StaticCache(config=model.config, max_cache_len=16 + 4 * args.steps + 16)
    token = torch.tensor([[42]])
    result = {"machine": machine(), "folder": args.folder, "dtype": args.dtype, "threads": args.threads}
    with torch.inference_mode():
        model(input_ids=torch.randint(5, 1000, (1, 16)), cache=cache, cache_position=torch.arange(16))
        position = iter(range(16, 16 + 4 * args.steps + 16))

        def step(network):
            return network(input_ids=token, cache=cache, cache_position=torch.tensor([next(position)])).logits

        def timed(network) -> float:
            for _ in range(3):
                step(network)
            started = time.perf_counter()
            for _ in range(args.steps):
                step(network)
            return (time.perf_counter() - started) / args.steps * 1e3

        result["eager_step_ms"] = round(timed(model), 2)
        compiled = compilation.compiled_forward(model)
        started = time.perf_counter()
        step(compiled)
        result["compile_s"] = round(time.perf_counter() - started, 1)
        result["compiled_step_ms"] = round(timed(compiled), 2)
        with torch.profiler.profile() as profile:
            for _ in range(5):
                step(compiled)
    rows = sorted(profile.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    result["compiled_step_by_op"] = [{"op": e.key[:60], "ms_per_step": round(e.self_cpu_time_total / 5e3, 2), "calls_per_step": e.count // 5,
                                      "us_per_call": round(e.self_cpu_time_total / max(e.count, 1), 1)} for e in rows]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
