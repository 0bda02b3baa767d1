"""The exact int8 x int8 -> int32 GEMM of the CPU backend.

llmint8's own kernel (kernels/cpu/int8_gemm.cpp, AVX2) is compiled on first use with torch's
cpp_extension and cached. Where it cannot be built (no compiler) or LLMINT8_CPU_GEMM=torch is
set, torch._int_mm (oneDNN) does the product instead: also exact, but slow on CPUs without VNNI.
"""

from __future__ import annotations

import functools
import os
import sys
from importlib import resources

import torch


@functools.cache
def native_kernels():
    """The compiled extension module, or None when it cannot be built here."""
    if os.environ.get("LLMINT8_CPU_GEMM", "native") == "torch":
        return None
    try:
        from torch.utils import cpp_extension

        source = resources.files("llmint8_cli.kernels") / "cpu" / "int8_gemm.cpp"
        flags = ["-O3"]
        if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
            flags += ["-mavx2", "-mfma", "-mf16c"]
        return cpp_extension.load(name="llmint8_cpu_gemm", sources=[str(source)], extra_cflags=flags, verbose=False)
    except Exception as exc:  # no compiler, no ninja, read-only cache...
        print(f"llmint8: native CPU int8 kernel unavailable ({type(exc).__name__}); using torch._int_mm", file=sys.stderr)
        return None


def gemm_name() -> str:
    """Which GEMM runs the int8 product on this machine (reported by `bench`)."""
    native = native_kernels()
    if native is None:
        return "torch._int_mm"
    return "llmint8-avx2" if native.has_avx2() else "llmint8-scalar"


def pack_weight(q: torch.Tensor) -> torch.Tensor:
    """Lay out W's int8 rows [n, k] once at load for the GEMM (row-major, contiguous)."""
    return q.contiguous()


def int8_gemm(a: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Exact int32 A[m, k] · W[n, k]^T."""
    native = native_kernels()
    if native is not None and a.device.type == "cpu":
        return native.int8_gemm(a.contiguous(), packed)
    return torch._int_mm(a.contiguous(), packed.t())
