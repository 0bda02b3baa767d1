"""End-to-end prefill/decode of a random-weight Llama built from a config (no downloads), 16-bit vs llm.int8.

    python bench/gpu_model_bench.py --device cuda --preset llama3-8b > OUT.json
    python bench/gpu_model_bench.py --device cpu --preset tiny       # the dry run of gpu_check.sh

Random weights time the same kernels as trained ones; outlier columns come from a planted pair
of large input features, as `bench` does for layers. JSON on stdout, as `llmint8 bench`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

PRESETS = {
    # Llama-3-8B's shapes (hidden 4096, FFN 14336, 32 layers, GQA 32/8 heads, vocab 128256)
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", choices=PRESETS, default="llama3-8b")
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    parser.add_argument("--prompt-tokens", default="128,2048")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from llmint8_cli.cli.common import json_safe, quiet_libraries
    from llmint8_cli.evaluation import speed
    from llmint8_cli.nn.convert import quantize_model

    quiet_libraries()
    device, dtype = torch.device(args.device), {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    config = LlamaConfig(max_position_embeddings=4096, **PRESETS[args.preset])
    torch.manual_seed(0)
    with device:
        base = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        base.get_input_embeddings().weight[:, [3, 17]] *= 40  # two outlier features, as in the paper's models
    networks = {args.dtype: base, "llm.int8": quantize_model(copy.deepcopy(base), "llm.int8", 6.0)}
    lengths = [int(n) for n in args.prompt_tokens.split(",")]
    batches = [int(n) for n in args.batch.split(",")]
    results = speed.bench_models(networks, lengths, batches, args.new_tokens, args.repeat, device)
    speed.add_speedups(results, args.dtype)
    document = {
        "machine": speed.machine(), "preset": args.preset, "config": PRESETS[args.preset], "dtype": args.dtype,
        "prompt_tokens": lengths, "batches": batches, "new_tokens": args.new_tokens, "repeat": args.repeat, "results": results,
    }
    json.dump(json_safe(document), sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
