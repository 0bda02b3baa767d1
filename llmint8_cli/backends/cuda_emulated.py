"""The CUDA backend with llmint8.cu's kernels run on the CPU, for the parity suite without a GPU.

The same Python as `CudaBackend` and the very kernel source, compiled as C++ against
kernels/cuda/cpu_emulation.h (CUDA's execution semantics: blocks of fiber threads, barriers,
warp shuffles, 16-bit conversions to nearest even). It is slow and only for tests:
`backend_for` never picks it.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

import torch

from llmint8_cli.backends.cpu_kernels import load_extension
from llmint8_cli.backends.cuda import CudaBackend, kernel_arguments, kernel_name


@functools.cache
def emulator():
    """The compiled extension (torch's extension cache, about 30 s the first time on a machine)."""
    folder = resources.files("llmint8_cli.kernels") / "cuda"
    files = [folder / "cpu_launch.cpp", folder / "cpu_emulation.h", folder / "llmint8.cu", *(folder / "emulated").iterdir()]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(files, key=str)) + torch.__version__.encode()).hexdigest()[:12]
    return load_extension(
        "the CUDA kernels for the CPU emulation", f"llmint8_cuda_on_cpu_{digest}", [str(folder / "cpu_launch.cpp")],
        extra_include_paths=[str(folder), str(folder / "emulated")], extra_cflags=["-O1", "-std=c++17", "-ffp-contract=off"],
    )


class EmulatedCudaBackend(CudaBackend):
    name = "cuda-emulated"

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def launch(self, name: str, grid: int, block: int, args: tuple, dtype: torch.dtype | None = None) -> None:
        if grid:
            emulator().launch(kernel_name(name, dtype), grid, block, kernel_arguments(args))
