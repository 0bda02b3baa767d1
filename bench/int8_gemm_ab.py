"""Interleaved A/B of llmint8's own int8 product (`int8_gemm`, the tile a decode step runs) between
the CPU kernels of a git revision and the working tree's, on weights streamed from memory (enough
copies to pass the caches), at decoded batch sizes; the sums of both are checked equal first.

    python bench/int8_gemm_ab.py --before HEAD~1 > ab.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

SHAPES = [(8192, 2048), (2048, 8192), (2048, 2048), (1536, 576), (576, 1536)]  # Llama-3.2-1B's and SmolLM2's [n, k]
STREAMED_BYTES = 96 << 20  # the copies of a weight timed in turn: three times a 32 MB L3


def kernels_at(revision: str, folder: Path):
    """The CPU kernels as they were at `revision`, built beside the working tree's (their torch
    library renamed: one process cannot register llmint8_cpu twice)."""
    from torch.utils import cpp_extension

    from llmint8_cli.backends import cpu_kernels

    sources, flags, _ = cpu_kernels.native_build()
    for path in Path(sources[0]).parent.iterdir():
        if path.suffix in (".cpp", ".h"):
            text = subprocess.run(["git", "show", f"{revision}:kernels/cpu/{path.name}"], capture_output=True, text=True, check=True).stdout
            (folder / path.name).write_text(text.replace("TORCH_LIBRARY(llmint8_cpu,", "TORCH_LIBRARY(llmint8_cpu_before,")
                                            .replace("TORCH_LIBRARY_IMPL(llmint8_cpu,", "TORCH_LIBRARY_IMPL(llmint8_cpu_before,"))
    built = [str(folder / Path(s).name) for s in sources]
    return cpp_extension.load(name=f"llmint8_before_{revision.replace('~', '_').replace('^', '_')}", sources=built, extra_cflags=flags,
                              build_directory=str(folder), verbose=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="HEAD~1", help="the git revision to compare with")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=8)
    args = parser.parse_args()

    from llmint8_cli.backends import cpu_kernels
    from llmint8_cli.evaluation.speed import machine

    torch.set_num_threads(args.threads)
    after = cpu_kernels.native_kernels()
    g = torch.Generator().manual_seed(0)
    result = {"machine": machine(), "before": args.before, "threads": args.threads, "rows": {}}
    with tempfile.TemporaryDirectory() as folder:
        before = kernels_at(args.before, Path(folder))
        for n, k in SHAPES:
            weights = [torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g) for _ in range(max(2, STREAMED_BYTES // (n * k)))]
            for m in (1, 2, 4, 8, 16):
                a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
                if not torch.equal(before.int8_gemm(a, weights[0]), after.int8_gemm(a, weights[0])):
                    raise SystemExit(f"{n}x{k} at {m} rows: the two kernels' sums differ")
                samples = {"before": [], "after": []}
                for _ in range(args.repeat):
                    for name, kernels in (("before", before), ("after", after)):
                        for w in weights:
                            started = time.perf_counter()
                            kernels.int8_gemm(a, w)
                            samples[name].append(time.perf_counter() - started)
                ms = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
                result["rows"][f"{n}x{k} m={m}"] = {"before_ms": round(ms["before"], 4), "after_ms": round(ms["after"], 4),
                                                    "speedup": round(ms["before"] / ms["after"], 2), "after_gb_per_s": round(n * k / ms["after"] / 1e6, 1)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
