"""Int8Linear: a drop-in for nn.Linear that holds int8 weights and runs the chosen method."""

from __future__ import annotations

import torch
from torch import nn

from llmint8_cli import ops
from llmint8_cli.backends import backend_for
from llmint8_cli.core import reference
from llmint8_cli.core.methods import DEFAULT_METHOD, DEFAULT_SMOOTH_ALPHA, check_alpha, check_rotation_block, get_method
from llmint8_cli.core.reference import QuantizedWeight
from llmint8_cli.errors import InvalidArgumentError


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows + fp32 row scales + exact 16-bit outlier columns.

    The buffers are exactly the checkpoint tensors: `weight` int8 [out, in], `weight_scale` fp32
    [out], `weight_zero` int32 [out] (zeropoint methods only), `outlier_idx` int32 [k],
    `outlier_weight` 16-bit [out, k] and `input_smooth` fp32 [in] (smoothing methods only: X's
    multiplier m; `weight` then holds W / m). Rotation methods hold W' R in `weight`, R's Hadamard
    blocks `rotation_block` wide. The forward pass is the op llmint8::int8_linear (ops.py), whose
    backend prepares the weight on first use and again whenever a buffer moves or changes.
    """

    # The dtype each tensor has in a checkpoint; the others (outlier_weight, bias) are the checkpoint's 16-bit dtype.
    STORED_DTYPES = {"weight": torch.int8, "weight_scale": torch.float32, "weight_zero": torch.int32, "outlier_idx": torch.int32, "input_smooth": torch.float32}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        method: str = DEFAULT_METHOD,
        threshold: float | None = None,
        num_outliers: int = 0,
        rotation_block: int = reference.ROTATION_BLOCK,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.method = get_method(method)
        if not self.method.quantized:
            raise InvalidArgumentError(f"method {method!r} keeps nn.Linear; Int8Linear needs a quantizing method")
        self.threshold = self.method.threshold_or_default(threshold)
        self.rotation_block = check_rotation_block(rotation_block) if self.method.rotation else 0
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        zero = torch.zeros(out_features, dtype=torch.int32, device=device) if self.method.zeropoint else None
        self.register_buffer("weight_zero", zero)
        self.register_buffer("outlier_idx", torch.zeros(num_outliers, dtype=torch.int32, device=device))
        self.register_buffer("outlier_weight", torch.zeros(out_features, num_outliers, dtype=dtype, device=device))
        smooth = torch.ones(in_features, dtype=torch.float32, device=device) if self.method.smoothing else None
        self.register_buffer("input_smooth", smooth)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        ops.register_layer(self)  # it keeps its weight's prepared state (ops.prepared)

    def __getstate__(self) -> dict:
        """Copies and pickles leave the prepared state out: it is made again from the copy's own tensors."""
        return {key: value for key, value in self.__dict__.items() if key != "_prepared"}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        ops.register_layer(self)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        method: str = DEFAULT_METHOD,
        threshold: float | None = None,
        outlier_idx: torch.Tensor | None = None,
        input_max: torch.Tensor | None = None,
        alpha: float = DEFAULT_SMOOTH_ALPHA,
        rotation_block: int = reference.ROTATION_BLOCK,
    ) -> "Int8Linear":
        """Quantize an nn.Linear; `outlier_idx` are calibrated columns kept exactly in 16-bit.

        Smoothing methods need `input_max`, each input feature's calibrated max |x|, and `alpha`;
        rotation methods take their Hadamard block width from `rotation_block`.
        """
        spec = get_method(method)
        smooth = None
        if spec.smoothing:
            if input_max is None:
                raise InvalidArgumentError(f"method {method!r} needs input_max, the calibrated max |x| of each input feature")
            stored = reference.stored_outlier_index(linear.weight, spec, outlier_idx)
            smooth = reference.smoothing_factors(input_max, linear.weight, check_alpha(alpha), stored)
        qweight = backend_for(linear.weight.device).quantize_weight(linear.weight, spec, outlier_idx, smooth, rotation_block)
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            method=method, threshold=threshold, num_outliers=qweight.outlier_idx.numel(), rotation_block=rotation_block,
            dtype=linear.weight.dtype, device=linear.weight.device,
        )
        layer.weight.copy_(qweight.int8.q)
        layer.weight_scale.copy_(qweight.int8.scale)
        if spec.zeropoint:
            layer.weight_zero.copy_(qweight.int8.zero)
        layer.outlier_idx.copy_(qweight.outlier_idx)
        layer.outlier_weight.copy_(qweight.outlier_weight)
        if spec.smoothing:
            layer.input_smooth.copy_(qweight.smooth)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def stored_value_problem(self) -> str | None:
        """What is wrong with the loaded buffers ("<tensor>: <why>"), or None: the values the
        forward pass trusts, each within its domain."""
        idx = self.outlier_idx.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.in_features):
            return f"outlier_idx: index {int(idx.min()) if int(idx.min()) < 0 else int(idx.max())} outside the {self.in_features} input features"
        if idx.unique().numel() != idx.numel():
            return "outlier_idx: an input feature is listed twice"
        if not bool(torch.isfinite(self.weight_scale).all()) or bool((self.weight_scale < 0).any()):
            return "weight_scale: holds NaN, Inf or negative scales"
        if self.input_smooth is not None and not bool((torch.isfinite(self.input_smooth) & (self.input_smooth > 0)).all()):
            return "input_smooth: holds NaN, Inf or non-positive factors"
        for name, tensor in (("outlier_weight", self.outlier_weight), ("bias", self.bias)):
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                return f"{name}: holds NaN or Inf"
        return None

    def quantized_weight(self) -> QuantizedWeight:
        """The buffers as the reference's QuantizedWeight (no copies)."""
        return ops.quantized_weight(self.weight, self.weight_scale, self.weight_zero, self.outlier_idx, self.outlier_weight, self.input_smooth,
                                    self.rotation_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One llmint8::int8_linear op (llmint8_cli/ops.py): compiled, exported and differentiated as one node.
        The tensors are read from _buffers directly: nn.Module.__getattr__ costs about 1 µs a lookup, 200 layers a token."""
        buffers = self._buffers
        return ops.int8_linear(x, buffers["weight"], buffers["weight_scale"], buffers["weight_zero"], buffers["outlier_idx"], buffers["outlier_weight"],
                               buffers["input_smooth"], self._parameters.get("bias"), self.method.name, self.threshold, self.rotation_block, owner=self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"method={self.method.name}, threshold={self.threshold}, stored_outliers={self.outlier_idx.numel()}"
            + (f", rotation_block={self.rotation_block}" if self.rotation_block else "")
        )
