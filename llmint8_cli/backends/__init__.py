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


__all__ = ["Backend", "CpuBackend", "available_backends", "backend_for"]
