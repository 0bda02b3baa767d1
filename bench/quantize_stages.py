"""CPU cost of each stage of `llmint8 quantize` on one 13B-sized weight (13824 x 5120 fp16).

    python bench/quantize_stages.py [--workdir /tmp/stages]

Times reading the tensor from a file (as SafetensorsSource does), the native row-wise int8
quantization, and the sha256 and write of its int8 output; prints wall and thread CPU time.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import torch

from llmint8_cli.backends.cpu import CpuBackend
from llmint8_cli.core.methods import get_method

SHAPE = (13824, 5120)


def measure(label: str, call, nbytes: int, repeat: int = 3):
    wall, cpu, result = float("inf"), float("inf"), None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.thread_time()
        result = call()
        cpu, wall = min(cpu, time.thread_time() - c0), min(wall, time.perf_counter() - w0)
    print(f"{label:34s} wall {wall * 1e3:7.1f} ms   thread CPU {cpu * 1e3:7.1f} ms   {nbytes / 1e6 / wall:6.0f} MB/s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llmint8-stages"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    source, target = args.workdir / "weight.f16", args.workdir / "weight.i8"
    weight = (torch.randn(SHAPE) * 0.02).half()
    weight.numpy().tofile(source)
    nbytes = weight.numel() * 2

    def read() -> torch.Tensor:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        with source.open("rb") as handle:
            handle.readinto(buffer.numpy())
        return buffer.view(torch.float16).reshape(SHAPE)

    loaded = measure("read (uninitialized buffer)", read, nbytes)
    backend, method = CpuBackend(), get_method("llm.int8")
    quantized = measure("quantize rows (native kernel)", lambda: backend.quantize_weight(loaded, method), nbytes)
    data = memoryview(quantized.int8.q.reshape(-1).view(torch.uint8).numpy())
    measure("sha256 of the int8 output", lambda: hashlib.sha256(data).hexdigest(), nbytes)

    def write() -> None:
        with target.open("wb") as handle:
            handle.write(data)

    measure("write of the int8 output", write, nbytes)
    source.unlink()
    target.unlink()


if __name__ == "__main__":
    main()
