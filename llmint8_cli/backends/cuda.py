"""CUDA backend (CuPy RawKernels from kernels/cuda/): not built yet, see the CUDA issue."""

from __future__ import annotations


def is_available() -> bool:
    return False
