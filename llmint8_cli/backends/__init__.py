"""Backends run the op contract of backends/base.py on a device; all must match the reference."""

from __future__ import annotations

import torch

from llmint8_cli.backends.base import Backend
from llmint8_cli.backends.cpu import CpuBackend


def available_backends() -> list[Backend]:
    """Every backend usable on this machine, the reference first."""
    backends: list[Backend] = [Backend(), CpuBackend()]
    from llmint8_cli.backends import cuda

    if cuda.is_available():
        backends.append(cuda.CudaBackend())
    return backends


_BY_DEVICE: dict[str, Backend] = {}


def backend_for(device: torch.device) -> Backend:
    """The fastest backend for tensors on `device` (cached per device type)."""
    kind = device.type
    if kind not in _BY_DEVICE:
        chosen: Backend = CpuBackend()
        if kind == "cuda":
            from llmint8_cli.backends import cuda

            if cuda.is_available():
                chosen = cuda.CudaBackend()
        _BY_DEVICE[kind] = chosen
    return _BY_DEVICE[kind]


def gemm_report() -> dict:
    """What ran the int8 products in this process: on the CPU the forced path or the plan of each
    shape, on a GPU how many products went through each route."""
    from llmint8_cli.backends import cpu_kernels, cuda

    forced = cpu_kernels.forced()
    return {"forced": forced.name if forced else None, "plans": dict(cpu_kernels.CHOSEN), **({"cuda": dict(cuda.GEMMS_RAN)} if cuda.GEMMS_RAN else {})}


__all__ = ["Backend", "CpuBackend", "available_backends", "backend_for", "gemm_report"]
