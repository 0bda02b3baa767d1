"""CUDA backend: CuPy RawKernels from kernels/cuda/llmint8.cu around cuBLASLt's int8 GEMM.

Row-wise absmax methods (llm.int8, vectorwise, rowwise, rowwise+decomp) run fused, the whole
batch at once with each sequence's own outlier columns: outlier detection and device-side
compaction, row quantization, one int8 GEMM (cuBLASLt through torch._int_mm), and one epilogue
that multiplies the outlier columns in 16-bit precision and applies the scales and the bias.
Nothing waits on the host and every shape is fixed by the input's, so a decode step can be
captured in a CUDA graph. Zeropoint, tensor-wise and rotation methods use the torch code of the
CPU backend on the GPU. Importing this module never needs CuPy; `is_available()` says whether
the backend can run.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from llmint8_cli.backends.cpu import CpuBackend, PreparedWeight
from llmint8_cli.core import reference
from llmint8_cli.core.methods import Method
from llmint8_cli.core.reference import Quantized

TYPES = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16", torch.float32: "float"}
TEMPLATED = ("detect_outlier_columns", "quantize_rows", "epilogue")
KERNEL_NAMES = (*(f"{kernel}<{t}>" for kernel in TEMPLATED for t in TYPES.values()), "compact_columns")  # every instantiation
COMPILE_OPTIONS = ("-std=c++17",)
CUBLASLT_MIN_ROWS, PADDED_ROWS = 16, 32  # torch._int_mm on CUDA takes more than 16 rows
EPILOGUE_TILE, EPILOGUE_THREADS = 64, 256  # llmint8.cu's kTile and kThreads
GEMMS_RAN: Counter = Counter()  # which int8 product ran, for `bench`'s report


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


@functools.cache
def kernel(name: str):
    """A kernel function, looked up once (never during a graph capture)."""
    return module().get_function(name)


def kernel_name(name: str, dtype: torch.dtype | None) -> str:
    return f"{name}<{TYPES[dtype]}>" if dtype is not None else name


def kernel_arguments(args: tuple) -> tuple:
    """Tensors as their device addresses (8-byte values, what a pointer parameter takes): no
    DLPack exchange, which would record events across streams and break a graph capture."""
    return tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)


@dataclass
class CudaPreparedWeight(PreparedWeight):
    stored_flags: torch.Tensor  # int32 [k]: 1 at the stored outlier columns, every sequence's preset flags
    stored_columns: torch.Tensor  # int32 [j]: the stored outlier columns, in stored_rows' order


class CudaBackend(CpuBackend):
    name = "cuda"

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def packs_for_cpu(self, device: torch.device) -> bool:
        return False

    def launch(self, name: str, grid: int, block: int, args: tuple, dtype: torch.dtype | None = None) -> None:
        """A kernel of llmint8.cu on torch's current stream (the capturing one inside a graph)."""
        import cupy

        if grid:
            with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
                kernel(kernel_name(name, dtype))((grid,), (block,), kernel_arguments(args))

    def prepare(self, qweight, method: Method) -> CudaPreparedWeight:
        """The CPU backend's preparation (stored columns as fp32 rows, once per device) and the
        int32 forms the kernels read."""
        prepared = super().prepare(qweight, method)
        stored = prepared.stored_mask.int()
        return CudaPreparedWeight(**vars(prepared), stored_flags=stored, stored_columns=qweight.outlier_idx.int())

    def int8_gemm(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Exact int32 A[m, k] W[n, k]^T through cuBLASLt (torch._int_mm) for every m: a decode
        step's rows padded to 32, which cuBLASLt needs (decoding reads all of W anyway, so the
        padding costs nothing); float64 where k or n is not a multiple of 8 (no model has such a
        layer; exact, |sum| < 2^53)."""
        m, k = a.shape
        n = w.shape[0]
        if not (k % 8 == 0 and n % 8 == 0 and m):
            GEMMS_RAN["float64"] += 1
            return (a.double() @ w.double().t()).to(torch.int32)
        if m > CUBLASLT_MIN_ROWS:
            GEMMS_RAN["cublaslt"] += 1
            return torch._int_mm(a.contiguous(), w.t())
        GEMMS_RAN[f"cublaslt, rows padded to {PADDED_ROWS}"] += 1
        padded = torch.zeros(PADDED_ROWS, k, dtype=torch.int8, device=a.device)
        padded[:m] = a
        return torch._int_mm(padded, w.t())[:m]

    @staticmethod
    def fused(method: Method) -> bool:
        return method.activation == "row" and not method.zeropoint and not method.rotation  # rotation: torch code, reference ops on the GPU

    def _quantize_on_device(self, x: torch.Tensor, method: Method, threshold: float, stored_flags: torch.Tensor, groups: int, exclude: torch.Tensor):
        """(Quantized, flags [groups, k], compacted columns flagged and not excluded, their count on
        the device, X as the kernels read it): no host synchronisation, shapes fixed by x's."""
        m, k = x.shape
        x = x.contiguous() if x.dtype in TYPES else x.float().contiguous()
        rows_per_group = np.int64(max(m // groups, 1))
        flags = stored_flags.repeat(groups, 1)
        limit = threshold if method.decomposition else float("inf")
        self.launch("detect_outlier_columns", min((m * k + 255) // 256, 65535), 256, (x, np.int64(m), np.int32(k), np.float32(limit), rows_per_group, flags), x.dtype)
        idx = torch.empty(k, dtype=torch.int32, device=x.device)
        count = torch.zeros(1, dtype=torch.int32, device=x.device)
        self.launch("compact_columns", 1, 1024, (flags, np.int32(groups), np.int32(k), exclude, idx, count))
        q = torch.empty(m, k, dtype=torch.int8, device=x.device)
        scale = torch.empty(m, dtype=torch.float32, device=x.device)
        self.launch("quantize_rows", m, 256, (x, np.int32(k), rows_per_group, flags, q, scale), x.dtype)
        return Quantized(q, scale, None), flags, idx, count, x

    def quantize_activations(self, x: torch.Tensor, method: Method, threshold: float, stored_idx: torch.Tensor, groups: int = 1,
                             rotation_block: int = reference.ROTATION_BLOCK):
        """The op contract's form: the 16-bit columns as an index (read back, so it synchronises)."""
        if not self.fused(method):
            return super().quantize_activations(x, method, threshold, stored_idx, groups, rotation_block)
        stored_flags = torch.zeros(x.shape[1], dtype=torch.int32, device=x.device)
        stored_flags[stored_idx] = 1
        qx, _, idx, count, _ = self._quantize_on_device(x, method, threshold, stored_flags, 1, torch.zeros_like(stored_flags))
        return qx, idx[: int(count.item())].long()

    def int8_accumulate(self, qx: Quantized, prepared: PreparedWeight) -> torch.Tensor:
        if qx.zero is not None or prepared.zero is not None:
            return super().int8_accumulate(qx, prepared)
        return self.int8_gemm(qx.q, prepared.packed)

    def linear(self, x: torch.Tensor, prepared: CudaPreparedWeight, method: Method, threshold: float, bias: torch.Tensor | None) -> torch.Tensor:
        """The whole batch in one call, each sequence with its own outlier columns."""
        if not self.fused(method):
            return super().linear(x, prepared, method, threshold, bias)
        return self._fused_linear(x, prepared, method, threshold, bias, reference.sequence_count(x) if method.decomposition else 1)

    def linear_call(self, x: torch.Tensor, prepared: CudaPreparedWeight, method: Method, threshold: float, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.fused(method):
            return super().linear_call(x, prepared, method, threshold, bias)
        return self._fused_linear(x, prepared, method, threshold, bias, 1)

    def _fused_linear(self, x, prepared: CudaPreparedWeight, method: Method, threshold: float, bias, groups: int) -> torch.Tensor:
        k = x.shape[-1]
        x2 = reference.smooth_activations(x.reshape(-1, k), prepared.qweight.smooth)  # X · m in fp32, one pass before the kernels
        qx, flags, idx, count, x_dev = self._quantize_on_device(x2, method, threshold, prepared.stored_flags, groups, prepared.stored_flags)
        acc = self.int8_gemm(qx.q, prepared.packed)
        m, n = acc.shape
        out = torch.empty(m, n, dtype=x_dev.dtype, device=x.device)
        bias_arg = bias.to(x_dev.dtype).contiguous() if bias is not None else out
        tiles = ((m + EPILOGUE_TILE - 1) // EPILOGUE_TILE) * ((n + EPILOGUE_TILE - 1) // EPILOGUE_TILE)
        self.launch(
            "epilogue", tiles, EPILOGUE_THREADS,
            (acc, qx.scale, prepared.scale, x_dev, np.int64(max(m // groups, 1)), flags, prepared.stored_columns, prepared.stored_rows,
             np.int32(prepared.stored_columns.numel()), idx, count, prepared.packed, bias_arg, np.int32(bias is not None),
             np.int64(m), np.int32(n), np.int32(k), out),
            x_dev.dtype,
        )
        return out.to(x.dtype).reshape(*x.shape[:-1], n)


__all__ = ["CudaBackend", "is_available"]
