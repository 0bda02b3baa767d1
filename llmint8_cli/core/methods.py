"""The nine quantization methods of the paper's Table 1 and llmint8's own two, one name each, used everywhere.

A method says how the activations X (rows = tokens) and the weights W (rows = output
features) are quantized, whether the 8-bit maps are symmetric (absmax) or asymmetric
(zeropoint), and whether outlier features go through the mixed-precision decomposition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmint8_cli.errors import InvalidArgumentError

DEFAULT_METHOD = "llm.int8"
DEFAULT_THRESHOLD = 6.0  # the paper's; every method's default but llm.int8-rotate's
ROTATE_THRESHOLD = 60.0  # after a 256-wide rotation only extreme features need 16-bit (bench/results/2026-12-05-rotation-block-256.md)
ROTATE_OUTLIER_RATIO = 16.0  # and systematic features 16x their layers' typical column, whatever their size (bench/results/2026-12-06-emergent-outliers-grid.md)
DEFAULT_SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength; measured best of 0.3/0.5/0.7 on SmolLM2
PAPER_METHODS = 9  # the first nine of METHODS are the paper's Table 1 (`--methods paper`)


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    activation: str | None  # "tensor" | "row" | None (not quantized)
    weight: str | None  # "tensor" | "row" | None
    zeropoint: bool = False
    decomposition: bool = False
    smoothing: bool = False  # per-input-feature smoothing calibrated at quantize time (not in the paper)
    rotation: bool = False  # the int8 part in a block-Hadamard basis (not in the paper)
    default_threshold: float = DEFAULT_THRESHOLD  # the outlier threshold when none is given
    default_outlier_ratio: float = 0.0  # calibration's systematic-feature ratio when none is given (0: the threshold alone)

    def threshold_or_default(self, threshold: float | None) -> float:
        """The threshold a run of this method uses: the one given (checked), else the method's own."""
        return self.default_threshold if threshold is None else check_threshold(threshold)

    def outlier_ratio_or_default(self, ratio: float | None) -> float:
        """The outlier ratio a calibration of this method uses: the one given, else the method's own (0 without decomposition)."""
        if ratio is not None:
            check_outlier_ratio(ratio)
        if not self.decomposition:
            return 0.0
        return self.default_outlier_ratio if ratio is None else float(ratio)

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
        Method("llm.int8-smooth", "llm.int8 + calibrated per-feature smoothing (beyond the paper)", "row", "row", decomposition=True, smoothing=True),
        Method("llm.int8-rotate", "llm.int8 with the int8 part in a block-Hadamard basis (beyond the paper)", "row", "row", decomposition=True, rotation=True,
               default_threshold=ROTATE_THRESHOLD, default_outlier_ratio=ROTATE_OUTLIER_RATIO),
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
    """'all', 'paper' (Table 1's nine) or a comma-separated list of names, in the order given, without repeats."""
    groups = {"all": list(METHODS), "paper": list(METHODS)[:PAPER_METHODS]}
    names = groups.get(spec.strip()) or [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise InvalidArgumentError("no method given")
    return [get_method(n) for n in dict.fromkeys(names)]


def check_threshold(threshold: float) -> float:
    """The outlier threshold must be a positive finite magnitude."""
    if not isinstance(threshold, (int, float)) or math.isnan(threshold) or threshold <= 0 or math.isinf(threshold):
        raise InvalidArgumentError(f"threshold must be a positive finite number, got {threshold!r}")
    return float(threshold)


def check_outlier_ratio(ratio: float) -> float:
    """0 (the threshold alone) or a finite ratio above 1: a feature must stand above its layer's typical column."""
    if not isinstance(ratio, (int, float)) or not (ratio == 0 or 1 < ratio < math.inf):
        raise InvalidArgumentError(f"outlier ratio must be 0 (off) or a finite number above 1, got {ratio!r}")
    return float(ratio)


def check_rotation_block(block: int) -> int:
    """A rotation block is a power of 4 from 4 to 1024, so that 1/sqrt(block) is an exact power of 2."""
    if isinstance(block, bool) or not isinstance(block, int) or block not in (4, 16, 64, 256, 1024):
        raise InvalidArgumentError(f"rotation block must be one of 4, 16, 64, 256, 1024 (a power of 4), got {block!r}")
    return block


def check_alpha(alpha: float) -> float:
    """The smoothing strength: 0 leaves X as it is, 1 moves all of its range into W."""
    if not isinstance(alpha, (int, float)) or math.isnan(alpha) or not 0 <= alpha <= 1:
        raise InvalidArgumentError(f"smoothing alpha must be between 0 and 1, got {alpha!r}")
    return float(alpha)
