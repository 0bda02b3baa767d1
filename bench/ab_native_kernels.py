"""The CPU kernels of this checkout against those of a git revision, in one process, alternating.

This machine's speed wanders by 2x from one minute to the next (a shared VM), so a change to the
native kernels is judged by timing both builds in turn on the same inputs: the earlier sources are
taken with `git show REV:...`, built under another name, and each case reports whether the two
builds give the same bits and the median over 5 rounds of (time of REV) / (time now), each round
30 calls of each taking turns (evaluation.speed.time_interleaved):

    python bench/ab_native_kernels.py REV

Cases: the activation side of a decoded batch (8 one-token sequences), the epilogue of one and of
8 decoded sequences with many or some stored 16-bit columns (SmolLM2's down_proj shapes), the
epilogue at 512 tokens with few columns, and the whole 4096 x 4096 AMX layer (quantize + fused
product and epilogue) where the CPU has AMX.
"""
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils import cpp_extension

from llmint8_cli.backends.cpu_kernels import native_build, native_kernels
from llmint8_cli.evaluation.speed import time_interleaved

FILES = ("int8_gemm.cpp", "amx_gemm.cpp", "amx_gemm.h")
CPU = torch.device("cpu")


def build_of(revision: str):
    """The kernels of `revision`, compiled under a name of their own."""
    folder = Path(tempfile.mkdtemp(prefix="llmint8-ab-"))
    for name in FILES:
        source = subprocess.run(["git", "show", f"{revision}:kernels/cpu/{name}"], capture_output=True, text=True, check=True).stdout
        (folder / name).write_text(source)
    commit = subprocess.run(["git", "rev-parse", "--short", revision], capture_output=True, text=True, check=True).stdout.strip()
    _, flags, _ = native_build()
    return cpp_extension.load(name=f"llmint8_ab_{commit}", sources=[str(folder / n) for n in FILES[:2]], extra_cflags=flags)


def compare(label: str, then, now, call) -> None:
    """call(module) runs the case on one build; both builds' outputs and times side by side."""
    first, second = call(then), call(now)
    same = all(torch.equal(a, b) for a, b in zip(first, second)) if isinstance(first, (list, tuple)) else torch.equal(first, second)
    rounds = [time_interleaved({"then": lambda: call(then), "now": lambda: call(now)}, 30, CPU) for _ in range(5)]
    ratios = [r["then"].median_ms / r["now"].median_ms for r in rounds]
    print(f"{label:64s} {'same bits' if same else 'other bits'}  then/now {statistics.median(ratios):.2f} "
          f"({min(ratios):.2f}-{max(ratios):.2f}), now {statistics.median(r['now'].median_ms for r in rounds):.3f} ms", flush=True)


def epilogue_case(m: int, k: int, n: int, stored: int, g: torch.Generator):
    """dequantize_sequences' arguments: m one-token sequences, `stored` of k columns stored."""
    columns = torch.randperm(k, generator=g)[:stored]
    masks = torch.zeros(m, k, dtype=torch.bool)
    masks[:, columns] = True
    pos = torch.full((k,), -1, dtype=torch.int32)
    pos[columns] = torch.arange(stored, dtype=torch.int32)
    rows = torch.randn(stored, n, generator=g)
    acc = torch.randint(-2**20, 2**20, (m, n), dtype=torch.int32, generator=g)
    return (acc, torch.rand(m, generator=g), torch.randn(m, k, generator=g).bfloat16(), masks, torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g),
            torch.rand(n, generator=g), rows, pos, torch.randn(n, generator=g).bfloat16(), rows.bfloat16(), None)


def main(revision: str) -> None:
    then, now = build_of(revision), native_kernels()
    g = torch.Generator().manual_seed(0)
    for k in (576, 1536):
        x = torch.randn(8, k, generator=g).bfloat16()
        mask = torch.zeros(k, dtype=torch.bool)
        mask[::97] = True
        compare(f"quantize_sequences, 8 sequences of 1 token, k={k}", then, now, lambda mod: mod.quantize_sequences(x, mask, 6.0, 8, None))
    for m, stored in ((1, 1500), (8, 1500), (1, 98), (8, 98)):
        args = epilogue_case(m, 1536, 576, stored, g)
        compare(f"dequantize_sequences, {m} x 1 token, {stored} of 1536 stored, n=576", then, now, lambda mod: mod.dequantize_sequences(*args))
    for stored in (1, 6, 40):
        args = epilogue_case(512, 576, 576, stored, g)
        args = (args[0], args[1], args[2], args[3][:1], *args[4:])  # one sequence of 512 tokens
        compare(f"dequantize_sequences, 512 tokens, {stored} of 576 stored, n=576", then, now, lambda mod: mod.dequantize_sequences(*args))
    if not now.has_amx():
        return
    k = n = 4096
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    packed = {id(then): then.amx_pack(w), id(now): now.amx_pack(w)}
    for m in (16, 128, 512):
        x = torch.randn(m, k, generator=g)
        columns = torch.randperm(k, generator=g)[:6]
        x[:, columns] *= 20
        x = x.bfloat16()
        mask = torch.zeros(k, dtype=torch.bool)
        mask[columns] = True
        pos = torch.full((k,), -1, dtype=torch.int32)
        pos[columns] = torch.arange(6, dtype=torch.int32)
        rows, scale = torch.randn(6, n, generator=g), torch.rand(n, generator=g)

        def layer(mod):
            q, sx, masks = mod.quantize_sequences(x, mask, 6.0, 1, None)
            return mod.amx_linear(q, packed[id(mod)], n, sx, x, masks, w, scale, rows, pos, None, rows.bfloat16(), None)

        compare(f"4096x4096 AMX layer, {m} tokens, 6 columns", then, now, layer)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/ab_native_kernels.py REV")
    main(sys.argv[1])
