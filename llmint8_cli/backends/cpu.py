"""CPU backend: true int8 arithmetic (int8 x int8 -> int32), never a dequantized-weight matmul.

The weight-side work (the GEMM path's layout, row sums for zero points, fp32 outlier columns)
is done once in `prepare`. The product runs through the path measured fastest on this machine
(cpu_kernels.py: oneDNN prepacked or `torch._int_mm`, or llmint8's own AVX2 kernel); the
activation side and the epilogue of the row-wise methods run in llmint8's native kernels.
The code is plain torch and also serves CUDA tensors when CuPy is missing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmint8_cli.backends.base import Backend
from llmint8_cli.backends import cpu_kernels
from llmint8_cli.backends.cpu_kernels import GemmPlan, native_kernels
from llmint8_cli.core import reference
from llmint8_cli.core.methods import Method, check_rotation_block
from llmint8_cli.core.reference import Quantized, QuantizedWeight
from llmint8_cli.errors import InvalidWeightError


@dataclass
class PreparedWeight:
    qweight: QuantizedWeight
    gemm: GemmPlan | None  # the int8 product chosen for this weight (None: CUDA tensors without CuPy)
    packed: object  # the int8 weight in the layouts of the plan's paths
    scale: torch.Tensor  # fp32 [n]
    zero: torch.Tensor | None  # int32 [n]
    row_sum: torch.Tensor  # int32 [n]: sum over k of qw, for zero-point corrections
    stored_rows: torch.Tensor  # fp32 [j, n]: the exact stored outlier columns of W, one per row
    stored_rows_bf16: torch.Tensor | None  # the same in bf16, where the CPU multiplies bf16 natively (the epilogue's GEMM for many columns)
    stored_mask: torch.Tensor  # bool [k]: True at the stored outlier columns
    stored_pos: torch.Tensor  # int32 [k]: row of a column in stored_rows, -1 if not stored
    one_call: bool  # the native rowwise_linear may run the whole layer (a row-wise absmax method, not rotated) where the plan's path is its own


def column_mask(k: int, columns: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """bool [k], True at `columns`."""
    mask = torch.zeros(k, dtype=torch.bool, device=device)
    mask[columns] = True
    return mask


class CpuBackend(Backend):
    name = "cpu"

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def _native_for(self, tensor: torch.Tensor, granularity: str | None, method: Method):
        """The native kernels when they can take this call (CPU tensor, per-row absmax maps), else None."""
        native = native_kernels()
        usable = native is not None and self.packs_for_cpu(tensor.device) and granularity == "row" and not method.zeropoint
        return native if usable else None

    def quantize_weight(self, weight: torch.Tensor, method: Method, outlier_idx: torch.Tensor | None = None, smooth: torch.Tensor | None = None,
                        rotation_block: int = reference.ROTATION_BLOCK) -> QuantizedWeight:
        """Per-row absmax weights through the fused native op: read as stored (16-bit), NaN check in the same pass."""
        native = self._native_for(weight, method.weight, method) if isinstance(weight, torch.Tensor) else None
        if native is None or method.rotation:  # rotated weights: the reference's own code (once, at quantize time)
            return super().quantize_weight(weight, method, outlier_idx, smooth, rotation_block)
        reference.check_weight(weight, finite=False)
        idx = reference.stored_outlier_index(weight, method, outlier_idx)
        smooth = reference.check_smooth(weight, method, smooth, idx)
        rows = reference.smooth_weight(weight, smooth).detach().contiguous()
        q, scale, columns = native.quantize_rows(rows, column_mask(weight.shape[1], idx), math.inf)
        if int(columns.sum()) != idx.numel():  # a column beyond the stored ones holds NaN or Inf
            raise InvalidWeightError(reference.NONFINITE_WEIGHT)
        return QuantizedWeight(Quantized(q, scale, None), idx, weight.detach()[:, idx].contiguous(), smooth)

    def packs_for_cpu(self, device: torch.device) -> bool:
        """Whether prepared weights take a CPU GEMM's layout (the CUDA backend keeps int8 rows as they are)."""
        return device.type == "cpu"

    def prepare(self, qweight: QuantizedWeight, method: Method) -> PreparedWeight:
        """The fused row-wise linear may take a float32 product; the others need int32 sums."""
        q = qweight.int8
        on_cpu = self.packs_for_cpu(q.q.device)
        gemm = cpu_kernels.choose(tuple(q.q.shape), int32=self._native_for(q.q, method.activation, method) is None) if on_cpu else None
        row_sum = q.q.sum(dim=1, dtype=torch.int32)
        k, stored = q.q.shape[1], qweight.outlier_idx
        stored_mask = column_mask(k, stored, q.q.device)
        stored_pos = torch.full((k,), -1, dtype=torch.int32, device=q.q.device)
        stored_pos[stored] = torch.arange(stored.numel(), dtype=torch.int32, device=q.q.device)
        packed = gemm.pack(q.q) if on_cpu else q.q.contiguous()
        stored_rows = qweight.outlier_weight.float().t().contiguous()
        stored_rows_bf16 = stored_rows.bfloat16() if on_cpu and cpu_kernels.native_bf16() else None
        one_call = self._native_for(q.q, method.activation, method) is not None and not method.rotation
        return PreparedWeight(qweight, gemm, packed, q.scale, q.zero, row_sum, stored_rows, stored_rows_bf16, stored_mask, stored_pos, one_call)

    def quantize_activations(self, x: torch.Tensor, method: Method, threshold: float, stored_idx: torch.Tensor, groups: int = 1,
                             rotation_block: int = reference.ROTATION_BLOCK) -> tuple[Quantized, torch.Tensor]:
        """Row-wise absmax methods go through the fused native op; the others through the reference."""
        native = self._native_for(x, method.activation, method)
        if native is None:
            return super().quantize_activations(x, method, threshold, stored_idx, groups, rotation_block)
        if method.rotation:
            block = check_rotation_block(rotation_block)
            q, scale, masks, _ = native.quantize_rotated_sequences(x.contiguous(), column_mask(x.shape[1], stored_idx), threshold, 1, block)
            return Quantized(q, scale, None), torch.nonzero(masks[0]).flatten()
        q, scale, columns = native.quantize_rows(x.contiguous(), column_mask(x.shape[1], stored_idx), threshold if method.decomposition else math.inf)
        return Quantized(q, scale, None), torch.nonzero(columns).flatten()

    def int8_accumulate(self, qx: Quantized, prepared: PreparedWeight) -> torch.Tensor:
        """sum_k (qx - zx)(qw - zw) = qx·qw - zw Σqx - zx Σqw + k zx zw, all in int32."""
        if prepared.gemm is not None and prepared.gemm.int32:
            acc = prepared.gemm.run(qx.q, prepared.packed)
        else:  # a float32 product is exact only as a float; CUDA tensors without CuPy
            acc = cpu_kernels.PATHS["onednn-nk"].run(qx.q, prepared.qweight.int8.q)
        if qx.zero is None and prepared.zero is None:
            return acc
        k = qx.q.shape[1]
        if prepared.zero is not None:
            acc -= qx.q.sum(dim=1, dtype=torch.int32)[:, None] * prepared.zero[None, :]
        if qx.zero is not None:
            w_centered = prepared.row_sum if prepared.zero is None else prepared.row_sum - k * prepared.zero
            acc -= qx.zero[:, None] * w_centered[None, :]
        return acc

    def linear(self, x: torch.Tensor, prepared: PreparedWeight, method: Method, threshold: float, bias: torch.Tensor | None) -> torch.Tensor:
        """Row-wise absmax methods: one native call for the whole batch, each sequence with its own outliers."""
        native = self._native_for(x, method.activation, method)
        if native is None:
            return super().linear(x, prepared, method, threshold, bias)
        k = x.shape[-1]
        x2 = x.reshape(-1, k).contiguous()
        smooth = prepared.qweight.smooth  # read as x * m inside both native calls
        groups = reference.sequence_count(x) if method.decomposition else 1
        if method.rotation:
            return self._rotated_linear(x, x2, prepared, threshold, bias, groups)
        path = prepared.gemm.path_for(x2.shape[0])
        if path.whole_layer:  # one native call, nothing between its three steps
            out = native.rowwise_linear(*self._one_call_arguments(x, x2, prepared, method, threshold, bias, path))
        else:
            q, sx, masks = native.quantize_sequences(x2, prepared.stored_mask, threshold if method.decomposition else math.inf, groups, smooth)
            out = self._finish(x, q, sx, x2, masks, prepared, bias, smooth)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def _one_call_arguments(x, x2, prepared: PreparedWeight, method: Method, threshold: float, bias, path: cpu_kernels.GemmPath | None) -> tuple:
        """rowwise_linear's arguments: x as [m, k] rows, the prepared weight (W as stored), the threshold, the sequences,
        and the product: `path`'s (llmint8's own tile or oneDNN's), or llmint8's own tile where None."""
        return (x2, prepared.qweight.int8.q, prepared.scale, prepared.stored_mask, prepared.stored_rows, prepared.stored_pos, bias,
                prepared.stored_rows_bf16 if x.dtype == torch.bfloat16 else None, prepared.qweight.smooth,
                threshold if method.decomposition else math.inf, reference.sequence_count(x) if method.decomposition else 1,
                *(path.one_call_product(prepared.packed[path.name]) if path is not None else (None, False)))

    TRACED_NATIVE_ROWS = 16  # a compiled graph runs up to this many rows (a decoded batch) through rowwise_linear's own tile where the plan's path cannot run in it

    def traced_linear(self, x: torch.Tensor, prepared: PreparedWeight, method: Method, threshold: float, bias: torch.Tensor | None) -> torch.Tensor | None:
        """llmint8_cpu::rowwise_linear, where the plan's path for this many rows runs inside it (llmint8's
        tile, oneDNN's `_int_mm`) or there are few rows: the Python op around another path (oneDNN's
        prepacked weight, which a graph cannot hold) costs more in a graph (~40 µs a call) than the
        native tile loses to it, if anything, up to 16 rows (a decoded batch: its 8-row tile)."""
        if not prepared.one_call:
            return None
        rows = x.numel() // x.shape[-1]
        path = prepared.gemm.path_for(rows)
        if not path.whole_layer and rows > self.TRACED_NATIVE_ROWS:
            return None
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.ops.llmint8_cpu.rowwise_linear(*self._one_call_arguments(x, x2, prepared, method, threshold, bias, path if path.whole_layer else None))
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def _finish(x, q, sx, x2, masks, prepared: PreparedWeight, bias, smooth) -> torch.Tensor:
        """The int8 product and the native epilogue (scales, 16-bit columns, bias), fused where the path can."""
        return prepared.gemm.linear(
            q, prepared.packed, sx, x2, masks, prepared.qweight.int8.q, prepared.scale, prepared.stored_rows, prepared.stored_pos, bias,
            prepared.stored_rows_bf16 if x.dtype == torch.bfloat16 else None, smooth,
        )

    @staticmethod
    def _rotated_linear(x, x2, prepared: PreparedWeight, threshold: float, bias, groups: int) -> torch.Tensor:
        """Rotation methods, the batch in one GEMM: X' R per sequence, the stored columns in the native
        epilogue, the columns that are outliers only in one sequence added to that sequence's rows."""
        native, (m, k) = native_kernels(), x2.shape
        block = prepared.qweight.rotation_block
        q, sx, masks, runtime_only = native.quantize_rotated_sequences(x2, prepared.stored_mask, threshold, groups, block)
        # the stored columns, the same for every sequence: one mask row
        out = CpuBackend._finish(x, q, sx, x2, prepared.stored_mask.view(1, k), prepared, bias, None)
        if runtime_only:  # rare once calibrated
            runtime = masks > prepared.stored_mask
            for g in torch.nonzero(runtime.any(dim=1)).flatten().tolist():
                rows, cols = slice(g * (m // groups), (g + 1) * (m // groups)), torch.nonzero(runtime[g]).flatten()
                extra = x2[rows][:, cols].float() @ reference.unrotated_columns(prepared.qweight.int8, cols, block).T
                out[rows] = (out[rows].float() + extra).to(out.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def linear_call(self, x: torch.Tensor, prepared: PreparedWeight, method: Method, threshold: float, bias: torch.Tensor | None) -> torch.Tensor:
        k = x.shape[-1]
        x2 = reference.smooth_activations(x.reshape(-1, k), prepared.qweight.smooth)
        qx, fp_idx = self.quantize_activations(x2, method, threshold, prepared.qweight.outlier_idx, reference.sequence_count(x),
                                               prepared.qweight.rotation_block or reference.ROTATION_BLOCK)
        out = self.int8_accumulate(qx, prepared).float()
        out *= qx.scale[:, None] * prepared.scale[None, :]
        if fp_idx.numel():
            out.addmm_(x2[:, fp_idx].float(), self._fp_rows(prepared, fp_idx))
        if bias is not None:
            out += bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def _fp_rows(prepared: PreparedWeight, fp_idx: torch.Tensor) -> torch.Tensor:
        """W[:, fp_idx]^T in fp32; the common case (only stored columns) needs no work."""
        stored = prepared.qweight.outlier_idx
        if stored.numel() == fp_idx.numel() and torch.equal(stored, fp_idx):
            return prepared.stored_rows
        return reference.outlier_weight_columns(prepared.qweight, fp_idx).T
