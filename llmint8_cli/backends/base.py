"""The op contract every backend implements; the defaults are the reference (the spec).

A backend may replace any op with a faster one, but must give the same int8 values, the same
int32 accumulations and (within the parity tolerance) the same outputs as the reference. The
parity suite in tests/test_backend_parity.py checks each op of every available backend.
"""

from __future__ import annotations

from typing import Any

import torch

from llmint8_cli.core import reference
from llmint8_cli.core.methods import Method
from llmint8_cli.core.reference import Quantized, QuantizedWeight


class Backend:
    """Reference implementation of the ops; subclasses override what they accelerate."""

    name = "reference"

    def supports(self, device: torch.device) -> bool:
        return True

    def quantize_weight(self, weight: torch.Tensor, method: Method, outlier_idx: torch.Tensor | None = None, smooth: torch.Tensor | None = None,
                        rotation_block: int = reference.ROTATION_BLOCK) -> QuantizedWeight:
        """W [n, k] (W / m with smoothing, W' R with rotation) to int8 for a method, stored outlier columns kept exact (done once, at quantize time)."""
        return reference.quantize_weight(weight, method, outlier_idx, smooth, rotation_block)

    def prepare(self, qweight: QuantizedWeight, method: Method) -> Any:
        """Weight-side work done once at load (layout, packing, sums); returns the backend's state."""
        return qweight

    def quantize_activations(self, x: torch.Tensor, method: Method, threshold: float, stored_idx: torch.Tensor, groups: int = 1,
                             rotation_block: int = reference.ROTATION_BLOCK) -> tuple[Quantized, torch.Tensor]:
        return reference.quantize_activations(x, method, threshold, stored_idx, groups, rotation_block)

    def int8_accumulate(self, qx: Quantized, prepared: Any) -> torch.Tensor:
        return reference.int8_accumulate(qx, prepared.int8)

    def linear(self, x: torch.Tensor, prepared: Any, method: Method, threshold: float, bias: torch.Tensor | None) -> torch.Tensor:
        """The whole linear; outliers are detected per sequence, as in the reference."""
        return reference.each_sequence(x, method, lambda part: self.linear_call(part, prepared, method, threshold, bias))

    def traced_linear(self, x: torch.Tensor, prepared: Any, method: Method, threshold: float, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The whole linear as one native torch op that a compiled graph calls without Python, or
        None where the backend has none for this call (the graph then calls llmint8::int8_linear)."""
        return None

    def linear_call(self, x: torch.Tensor, prepared: Any, method: Method, threshold: float, bias: torch.Tensor | None) -> torch.Tensor:
        """One matmul call over all of x's rows (what backends accelerate)."""
        return reference.linear_call(x, prepared, method, threshold, bias)
