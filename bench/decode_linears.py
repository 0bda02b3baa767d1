"""A decode step's int8 linears called back to back, bare (no model around them), as a compiled step
calls them: the rate at which they stream their int8 weights from memory, and the LM head's.

    python bench/decode_linears.py out/smollm2-135m-int8 --threads 1

Each layer gets one token of its own width, so the 210 weights of SmolLM2 (106 MB) come from memory,
not cache, as in a real step. Rows: the torch op a compiled graph calls (llmint8_cpu::rowwise_linear),
the same function through pybind (the eager path), the layer's own forward (ops.int8_linear, with its
Python), and the 16-bit head.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def timed(call, repeat: int) -> float:
    for _ in range(3):
        call()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()

    import llmint8_cli
    from llmint8_cli import compilation, ops
    from llmint8_cli.backends import cpu_kernels
    from llmint8_cli.evaluation.speed import machine
    from llmint8_cli.nn.linear import Int8Linear

    torch.set_num_threads(args.threads)
    model = llmint8_cli.load(args.folder, dtype=torch.bfloat16)
    compilation.prepare_layers(model)
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, layer.in_features, generator=g).bfloat16() for layer in layers]
    arguments = []
    for layer, x in zip(layers, inputs):
        state = ops.prepared_of(layer)
        arguments.append((x, layer.weight, state.scale, state.stored_mask, state.stored_rows, state.stored_pos, layer.bias,
                          state.stored_rows_bf16, layer.input_smooth, layer.threshold, 1))
    op, bound = torch.ops.llmint8_cpu.rowwise_linear, cpu_kernels.native_kernels().rowwise_linear
    head = model.get_output_embeddings()
    head_input = torch.randn(1, 1, head.in_features, generator=g).bfloat16()
    int8_bytes = sum(layer.weight.numel() for layer in layers)
    rows = {
        "llmint8_cpu::rowwise_linear (torch op)": (lambda: [op(*a) for a in arguments], int8_bytes),
        "rowwise_linear (pybind, eager path)": (lambda: [bound(*a) for a in arguments], int8_bytes),
        "Int8Linear.forward (eager, with Python)": (lambda: [layer(x) for layer, x in zip(layers, inputs)], int8_bytes),
        "16-bit LM head": (lambda: head(head_input), head.weight.numel() * head.weight.element_size()),
    }
    result = {"machine": machine(), "folder": args.folder, "threads": args.threads, "layers": len(layers), "vnni": cpu_kernels.native_kernels().has_vnni(),
              "rows": {}}
    with torch.inference_mode():
        for name, (call, size) in rows.items():
            seconds = timed(call, args.repeat)
            result["rows"][name] = {"ms": round(seconds * 1e3, 2), "gb_per_s": round(size / seconds / 1e9, 1)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
