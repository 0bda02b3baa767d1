"""CUDA backend: CuPy RawKernels from kernels/cuda/llmint8.cu around an int8 tensor-core GEMM.

Row-wise absmax methods (llm.int8, vectorwise, rowwise, rowwise+decomp) run fused: outlier
detection and device-side compaction (no host sync), row quantization, the int8 GEMM (WMMA
kernel or cuBLASLt through torch._int_mm, LLMINT8_CUDA_GEMM=wmma|cublaslt), and one epilogue
that applies the scales, the bias and the 16-bit product over the outlier columns only.
Zeropoint and tensor-wise methods use the torch code of the CPU backend on the GPU.
Importing this module never needs CuPy; `is_available()` says whether the backend can run.
"""

from __future__ import annotations

import functools
import os
from importlib import resources

import torch

from llmint8_cli.backends.cpu import CpuBackend, PreparedWeight
from llmint8_cli.core import reference
from llmint8_cli.core.methods import Method
from llmint8_cli.core.reference import Quantized

TYPES = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16", torch.float32: "float"}
TEMPLATED = ("detect_outlier_columns", "quantize_rows", "epilogue")
KERNEL_NAMES = (*(f"{kernel}<{t}>" for kernel in TEMPLATED for t in TYPES.values()), "compact_columns", "int8_gemm_wmma")  # every instantiation
COMPILE_OPTIONS = ("-std=c++17",)
CUBLASLT_MIN_ROWS, PADDED_ROWS = 16, 32  # torch._int_mm on CUDA takes more than 16 rows


def kernel_source() -> str:
    return (resources.files("llmint8_cli.kernels") / "cuda" / "llmint8.cu").read_text()


def is_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def module():
    import cupy

    return cupy.RawModule(code=kernel_source(), options=COMPILE_OPTIONS, name_expressions=list(KERNEL_NAMES))


def kernel(name: str, dtype: torch.dtype | None = None):
    return module().get_function(f"{name}<{TYPES[dtype]}>" if dtype is not None else name)


class CudaBackend(CpuBackend):
    name = "cuda"

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def packs_for_cpu(self, device: torch.device) -> bool:
        return False

    def launch(self, name: str, grid: int, block: int, args: tuple, dtype: torch.dtype | None = None) -> None:
        """A kernel of llmint8.cu on the current stream; tensors go to CuPy through DLPack."""
        import cupy

        converted = tuple(cupy.from_dlpack(a.detach()) if isinstance(a, torch.Tensor) else a for a in args)
        with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
            kernel(name, dtype)((max(grid, 1),), (block,), converted)

    def int8_gemm(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Exact int32 A[m, k] W[n, k]^T: WMMA, or cuBLASLt through torch._int_mm for every m (a
        decode step's rows padded to 32, which cuBLASLt needs: decoding reads all of W anyway, so
        the padding costs nothing), or float64 where k or n is not a multiple of 8."""
        import numpy as np

        m, k = a.shape
        n = w.shape[0]
        choice = os.environ.get("LLMINT8_CUDA_GEMM", "cublaslt")
        if choice == "wmma" and m % 16 == 0 and n % 16 == 0 and k % 16 == 0 and m * n:
            out = torch.empty(m, n, dtype=torch.int32, device=a.device)
            warps = (m // 16) * (n // 16)
            self.launch("int8_gemm_wmma", (warps * 32 + 127) // 128, 128, (a.contiguous(), w, out, np.int32(m), np.int32(n), np.int32(k)))
            return out
        if k % 8 == 0 and n % 8 == 0 and m:
            if m > CUBLASLT_MIN_ROWS:
                return torch._int_mm(a.contiguous(), w.t())
            padded = torch.zeros(PADDED_ROWS, k, dtype=torch.int8, device=a.device)
            padded[:m] = a
            return torch._int_mm(padded, w.t())[:m]
        return (a.double() @ w.double().t()).to(torch.int32)  # exact: |sum| < 2^53

    @staticmethod
    def fused(method: Method) -> bool:
        return method.activation == "row" and not method.zeropoint and not method.rotation  # rotation: torch code, reference ops on the GPU

    def _quantize_on_device(self, x: torch.Tensor, method: Method, threshold: float, stored_idx: torch.Tensor):
        """(Quantized, column idx buffer, count on device): no host synchronisation."""
        import numpy as np

        m, k = x.shape
        x = x.contiguous() if x.dtype in TYPES else x.float().contiguous()
        flags = torch.zeros(k, dtype=torch.int32, device=x.device)
        flags[stored_idx] = 1
        limit = threshold if method.decomposition else float("inf")
        self.launch("detect_outlier_columns", min((m * k + 255) // 256, 65535), 256, (x, np.int64(m), np.int32(k), np.float32(limit), flags), x.dtype)
        idx = torch.empty(k, dtype=torch.int32, device=x.device)
        count = torch.zeros(1, dtype=torch.int32, device=x.device)
        self.launch("compact_columns", 1, 1024, (flags, np.int32(k), idx, count))
        q = torch.empty(m, k, dtype=torch.int8, device=x.device)
        scale = torch.empty(m, dtype=torch.float32, device=x.device)
        self.launch("quantize_rows", m, 256, (x, np.int32(k), flags, q, scale), x.dtype)
        return Quantized(q, scale, None), idx, count, x

    def quantize_activations(self, x: torch.Tensor, method: Method, threshold: float, stored_idx: torch.Tensor, groups: int = 1,
                             rotation_block: int = reference.ROTATION_BLOCK):
        if not self.fused(method):
            return super().quantize_activations(x, method, threshold, stored_idx, groups, rotation_block)
        qx, idx, count, _ = self._quantize_on_device(x, method, threshold, stored_idx)
        return qx, idx[: int(count.item())].long()

    def int8_accumulate(self, qx: Quantized, prepared: PreparedWeight) -> torch.Tensor:
        if qx.zero is not None or prepared.zero is not None:
            return super().int8_accumulate(qx, prepared)
        return self.int8_gemm(qx.q, prepared.packed)

    def linear_call(self, x: torch.Tensor, prepared: PreparedWeight, method: Method, threshold: float, bias: torch.Tensor | None) -> torch.Tensor:
        import numpy as np

        if not self.fused(method):
            return super().linear_call(x, prepared, method, threshold, bias)
        k = x.shape[-1]
        x2 = reference.smooth_activations(x.reshape(-1, k), prepared.qweight.smooth)  # X · m in fp32, one pass before the kernels
        qx, idx, count, x_dev = self._quantize_on_device(x2, method, threshold, prepared.qweight.outlier_idx)
        acc = self.int8_gemm(qx.q, prepared.packed)
        m, n = acc.shape
        out = torch.empty(m, n, dtype=x_dev.dtype, device=x.device)
        w_out = prepared.qweight.outlier_weight.to(x_dev.dtype).contiguous()
        bias_arg = bias.to(x_dev.dtype).contiguous() if bias is not None else out
        self.launch(
            "epilogue", (m * n + 255) // 256, 256,
            (acc, qx.scale, prepared.scale, x_dev, idx, count, prepared.stored_pos, w_out, np.int32(w_out.shape[1]),
             prepared.packed, bias_arg, np.int32(bias is not None), np.int64(m), np.int32(n), np.int32(k), out),
            x_dev.dtype,
        )
        return out.to(x.dtype).reshape(*x.shape[:-1], n)


__all__ = ["CudaBackend", "is_available"]
