"""A prompt's int8 layers as one native call (rowwise_linear with oneDNN's product) against the
separate calls (quantize_sequences, the product, dequantize_sequences), interleaved round by round.

    python bench/prompt_layers_ab.py FOLDER --rows 128 [--rounds 7] [--threads 2]

FOLDER is an llmint8 folder (e.g. `llmint8 quantize smollm2-135m /tmp/s-int8`). Every Int8Linear
gets the activations a real prompt of --rows tokens gives it; each round calls all of them once per
variant. Prints JSON: the median ms of all layers per variant, with the machine.
"""

import argparse
import dataclasses
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import llmint8_cli
    from llmint8_cli.backends import cpu_kernels
    from llmint8_cli.evaluation.speed import machine
    from llmint8_cli.nn.linear import Int8Linear

    torch.set_num_threads(args.threads)
    model = llmint8_cli.load(args.folder, dtype=torch.bfloat16)
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda module, a: inputs.append((module, a[0]))) for m in model.modules() if isinstance(m, Int8Linear)]
    with torch.inference_mode():
        model(input_ids=torch.randint(5, 1000, (1, args.rows), generator=torch.Generator().manual_seed(0)))
    for hook in hooks:
        hook.remove()
    one_call = dict(cpu_kernels.PATHS)
    separate = {name: dataclasses.replace(path, whole_layer=False) if name.startswith("onednn") else path for name, path in one_call.items()}
    samples = {"one call": [], "separate calls": []}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for variant, paths in (("one call", one_call), ("separate calls", separate)):
                cpu_kernels.PATHS.clear()
                cpu_kernels.PATHS.update(paths)
                started = time.perf_counter()
                for layer, x in inputs:
                    layer(x)
                samples[variant].append((time.perf_counter() - started) * 1e3)
    cpu_kernels.PATHS.clear()
    cpu_kernels.PATHS.update(one_call)
    print(json.dumps({"machine": machine(), "folder": args.folder, "rows": args.rows, "layers": len(inputs), "threads": args.threads,
                      "median_ms": {variant: round(statistics.median(values), 1) for variant, values in samples.items()}}, indent=1))


if __name__ == "__main__":
    main()
