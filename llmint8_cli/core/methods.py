"""The nine quantization methods of the paper's Table 1, one name each, used everywhere.

A method says how the activations X (rows = tokens) and the weights W (rows = output
features) are quantized, whether the 8-bit maps are symmetric (absmax) or asymmetric
(zeropoint), and whether outlier features go through the mixed-precision decomposition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmint8_cli.errors import InvalidArgumentError

DEFAULT_METHOD = "llm.int8"
DEFAULT_THRESHOLD = 6.0


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    activation: str | None  # "tensor" | "row" | None (not quantized)
    weight: str | None  # "tensor" | "row" | None
    zeropoint: bool = False
    decomposition: bool = False

    @property
    def quantized(self) -> bool:
        return self.activation is not None

    @property
    def sequence_wide(self) -> bool:
        """A row's quantization depends on the other rows of its sequence (outlier columns, one tensor scale)."""
        return self.decomposition or self.activation == "tensor"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("fp16", "16-bit baseline, no quantization", None, None),
        Method("absmax", "tensor-wise absmax X and W", "tensor", "tensor"),
        Method("zeropoint", "tensor-wise zeropoint X and W", "tensor", "tensor", zeropoint=True),
        Method("rowwise", "row-wise absmax X, tensor-wise W", "row", "tensor"),
        Method("vectorwise", "row-wise X, per-output-row W (absmax)", "row", "row"),
        Method("zp-vectorwise", "vector-wise zeropoint X and W", "row", "row", zeropoint=True),
        Method("rowwise+decomp", "row-wise + mixed-precision decomposition", "row", "tensor", decomposition=True),
        Method("llm.int8", "vector-wise absmax + decomposition (LLM.int8())", "row", "row", decomposition=True),
        Method("llm.int8-zp", "vector-wise zeropoint + decomposition", "row", "row", zeropoint=True, decomposition=True),
    )
}


def get_method(name: str) -> Method:
    """Look a method up by name; unknown names raise with the list of valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown method {name!r}; choose one of: {', '.join(METHODS)}"
        ) from None


def parse_methods(spec: str) -> list[Method]:
    """'all' or a comma-separated list of names, in the order given, without repeats."""
    names = list(METHODS) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise InvalidArgumentError("no method given")
    return [get_method(n) for n in dict.fromkeys(names)]


def check_threshold(threshold: float) -> float:
    """The outlier threshold must be a positive finite magnitude."""
    if not isinstance(threshold, (int, float)) or math.isnan(threshold) or threshold <= 0 or math.isinf(threshold):
        raise InvalidArgumentError(f"threshold must be a positive finite number, got {threshold!r}")
    return float(threshold)
