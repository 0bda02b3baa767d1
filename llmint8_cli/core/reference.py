"""The readable torch reference of the numerics: this file is the spec every backend must match.

Notation: X is [m, k] (m tokens, k input features), W is [n, k] (n output features).

8-bit maps (all values land in [-127, 127]; -128 is never used):

* absmax, symmetric:   s = absmax(v) / 127,            q = round(v * 127 / absmax(v)),  v ≈ q * s
* zeropoint, affine:   lo = min(min v, 0), hi = max(max v, 0),
                       s = (hi - lo) / 254,             z = -127 - round(lo * 254 / (hi - lo)),
                       q = clamp(round(v * 254 / (hi - lo)) + z, -127, 127),      v ≈ (q - z) * s

  The range always contains 0, so z itself lies in [-127, 127] and an exact 0 maps to q = z.
  A row (or tensor) whose scale would be 0 gets q = 0 and s = 0: no division by zero, no NaN.

"tensor" granularity uses one (s, z) for the whole matrix, "row" one per row: per token for X,
per output feature for W ("vector-wise" = row-wise X and row-wise W). For activations of shape
[batch, seq, k] "tensor" means one map per sequence, so that results never depend on how many
sequences are batched together.

The int8 product accumulates exactly in int32 and is rescaled by the outer product of the row
scales (the zero points are removed inside the integer sum):

    C[i, j] = sx[i] * sw[j] * sum_k (qx[i, k] - zx[i]) * (qw[j, k] - zw[j])

Mixed-precision decomposition (LLM.int8(), paper §3.2): the set O of outlier features is every
column of X with some |x| >= threshold, found per sequence for activations [batch, seq, k] (each
sequence is its own call, as for "tensor" maps). Those columns are multiplied in 16-bit, the rest
in int8:

    Y = X[:, O] @ W[:, O]^T  +  C(X with columns O set to 0, W)  (+ bias)

W's columns in O come from two places. Columns found by calibration at quantize time ("stored"
outliers) are kept exactly in 16-bit, set to 0 in the int8 W and so excluded from its row scales.
Columns that are outliers only in this call use the dequantized int8 W columns.
Columns holding NaN or Inf always take the 16-bit path, with every method, so that non-finite
inputs propagate as they would through the 16-bit layer instead of poisoning a scale.

Smoothing (llm.int8-smooth, llmint8's tenth method, after SmoothQuant, Xiao et al. 2022): a
vector m [k] calibrated at quantize time moves range from X's features into W's columns,

    X W^T = (X · diag(m)) (W · diag(1/m))^T,     1/m_j = s_j = max|X_j|^a / max|W_j|^(1-a)

so that the features the int8 rows of X resolve poorly are scaled up and the large ones down.
X is multiplied by m (in fp32) before anything else; everything above then runs on X·m and on
W/m, which is what the checkpoint stores in int8. m is 1 at the stored outlier columns, whose W
stays exact, and at features with no calibrated range.

Rotation (llm.int8-rotate, llmint8's eleventh method, after QuaRot, Ashkboos et al. 2024): the
int8 part of the product is taken in a rotated basis,

    C(X', W') = X' W'^T = (X' R)(W' R)^T,     R = block-diagonal normalized Hadamard, R = R^T, R R = I

where X' is X with its 16-bit columns set to 0 and W' is W with its stored columns set to 0. Per
token, a value that is large against the rest of its row is spread over its block, so the row's
absmax (its int8 step) falls close to the row's typical size. The blocks cover k from the left,
b wide while they fit and then in smaller powers of 4 (b = 64, k = 172: 64, 64, 16, 16, 4, 4,
4). The block b is a power of 4 chosen at quantize time (ROTATION_BLOCK unless `--rotation-block`
says otherwise) and stored with the weight: a wider block spreads a large value thinner (v/sqrt(b)
per feature). A power of 4 keeps 1/sqrt(b) a power of 2, and the butterflies (a + b, a - b, in a fixed
order) are exact IEEE operations, so every backend can produce the same bits. X' R is quantized
row-wise and W' R per output row, which is what the checkpoint stores; the outlier columns stay
in the original basis (stored ones exact, run-time ones are columns of the dequantized int8 W
rotated back: W ≈ dequantize(W' R) R).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmint8_cli.core.methods import Method, check_rotation_block
from llmint8_cli.errors import InvalidArgumentError, InvalidWeightError

INT8_MAX = 127
ROTATION_BLOCK = 256  # the default Hadamard block (a power of 4: 1/sqrt(b) is exact); bench/results/2026-12-05-rotation-block-256.md
FIRST_ROTATION_BLOCK = 64  # the default until 2026-12-06: version-3 folders and cache names that carry no block hold it


@dataclass
class Quantized:
    """int8 values with one affine map per row: v ≈ (q - zero) * scale."""

    q: torch.Tensor  # int8 [r, k]
    scale: torch.Tensor  # fp32 [r]
    zero: torch.Tensor | None  # int32 [r]; None for symmetric (absmax) maps


@dataclass
class QuantizedWeight:
    """A linear layer's weight: the int8 part plus the stored outlier columns in 16-bit."""

    int8: Quantized  # q [n, k]
    outlier_idx: torch.Tensor  # int64 [j], sorted, unique
    outlier_weight: torch.Tensor  # 16-bit [n, j]: exact W[:, outlier_idx]
    smooth: torch.Tensor | None = None  # fp32 [k]: m, X's multiplier (smoothing methods only)
    rotation_block: int = 0  # rotation methods: the int8 part holds W' R, R's blocks this wide; 0 = not rotated


def divide(numerator, denominator: torch.Tensor) -> torch.Tensor:
    """IEEE fp32 division, elementwise; 0 where the denominator is 0.

    Written out because torch turns `scalar / tensor` into `reciprocal(tensor) * scalar` and
    `tensor / scalar` into a multiply, each off by an ulp at times; backends divide for real.
    """
    top = torch.as_tensor(numerator, dtype=torch.float32).expand_as(denominator).contiguous() if not isinstance(numerator, torch.Tensor) else numerator
    bottom = denominator.contiguous()
    return torch.where(bottom != 0, top / torch.where(bottom != 0, bottom, torch.ones_like(bottom)), torch.zeros_like(bottom))


def quantize(v: torch.Tensor, granularity: str, zeropoint: bool, groups: int = 1) -> Quantized:
    """Quantize a 2-D tensor to int8 with one map per row ("row") or per block of rows ("tensor").

    "tensor" splits the rows into `groups` equal blocks (one per sequence) with one map each.
    """
    v = v.float()
    rows = v.shape[0]

    def reduce(values: torch.Tensor, op) -> torch.Tensor:
        if not values.numel():
            return values.new_zeros(rows)
        if granularity == "row":
            return op(values, dim=1)
        per_group = op(values.reshape(groups, -1), dim=1)
        return per_group.repeat_interleave(rows // groups)

    if not zeropoint:
        absmax = reduce(v.abs(), torch.amax)
        inv = divide(float(INT8_MAX), absmax)
        q = torch.round(v * inv[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        return Quantized(q, divide(absmax, torch.full_like(absmax, INT8_MAX)), None)
    lo = reduce(v, torch.amin).clamp(max=0)
    hi = reduce(v, torch.amax).clamp(min=0)
    spread = hi - lo
    inv = divide(float(2 * INT8_MAX), spread)
    zero = (-INT8_MAX - torch.round(lo * inv)).to(torch.int32)
    q = (torch.round(v * inv[:, None]) + zero[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return Quantized(q, divide(spread, torch.full_like(spread, 2 * INT8_MAX)), zero.contiguous())


def dequantize(qt: Quantized, columns: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 values of the int8 map, optionally only the given columns."""
    q = qt.q if columns is None else qt.q[:, columns]
    q = q.float()
    if qt.zero is not None:
        q = q - qt.zero[:, None].float()
    return q * qt.scale[:, None]


def find_outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Sorted indices of the columns of x holding some |x| >= threshold, NaN or Inf."""
    return torch.nonzero(~(x.abs() < threshold).all(dim=0)).flatten()


def check_weight(weight: torch.Tensor, finite: bool = True) -> None:
    """Only finite 2-D floating-point weights can be quantized (`finite=False` skips the NaN/Inf scan)."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise InvalidWeightError(f"weight must be a floating-point tensor, got {getattr(weight, 'dtype', type(weight))}")
    if weight.dim() != 2:
        raise InvalidWeightError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if finite and not torch.isfinite(weight).all():
        raise InvalidWeightError(NONFINITE_WEIGHT)


NONFINITE_WEIGHT = "weight holds NaN or Inf values and cannot be quantized"


def stored_outlier_index(weight: torch.Tensor, method: Method, outlier_idx: torch.Tensor | None) -> torch.Tensor:
    """The sorted, unique, in-range columns kept in 16-bit (none for methods without decomposition)."""
    if outlier_idx is None or not method.decomposition:
        return torch.zeros(0, dtype=torch.long, device=weight.device)
    idx = torch.unique(torch.as_tensor(outlier_idx, device=weight.device).long().flatten())
    if idx.numel() and (idx.min() < 0 or idx.max() >= weight.shape[1]):
        raise InvalidArgumentError(f"outlier column index out of range for in_features={weight.shape[1]}")
    return idx


def smoothing_factors(input_max: torch.Tensor, weight: torch.Tensor, alpha: float, stored_idx: torch.Tensor) -> torch.Tensor:
    """m [k] fp32, X's multiplier: max|W_j|^(1-a) / max|X_j|^a; 1 where either range is 0 or not finite, and at the stored columns."""
    x_max = torch.as_tensor(input_max, dtype=torch.float32, device=weight.device).flatten()
    if x_max.numel() != weight.shape[1]:
        raise InvalidArgumentError(f"smoothing: {x_max.numel()} calibrated input ranges for in_features={weight.shape[1]}")
    w_max = weight.detach().float().abs().amax(dim=0)
    m = w_max.pow(1 - alpha) / x_max.pow(alpha)
    usable = (x_max > 0) & (w_max > 0) & torch.isfinite(m) & (m > 0)
    m = torch.where(usable, m, torch.ones_like(m))
    m[stored_idx.to(m.device)] = 1.0
    return m.contiguous()


def smooth_weight(weight: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """W / m in fp32 (W as it is without smoothing)."""
    return weight if smooth is None else weight.detach().float() / smooth[None, :]


def smooth_activations(x: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """X · m in fp32 (X as it is without smoothing): the first op of a smoothing method's linear."""
    return x if smooth is None else x.float() * smooth


def rotation_blocks(k: int, block: int = ROTATION_BLOCK) -> list[tuple[int, int]]:
    """(start, size) of R's diagonal blocks over k features: `block` wide, then smaller powers of 4."""
    blocks, start, size = [], 0, check_rotation_block(block)
    while start < k:
        while size > k - start:
            size //= 4
        blocks.append((start, size))
        start += size
    return blocks


def hadamard(v: torch.Tensor, size: int) -> torch.Tensor:
    """v [..., size] times the normalized Sylvester-Hadamard matrix (fp32; size a power of 4): butterflies, then 1/sqrt(size)."""
    shape = v.shape
    v = v.float()
    half = 1
    while half < size:
        pairs = v.reshape(*shape[:-1], size // (2 * half), 2, half)
        v = torch.stack((pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]), dim=-2)
        half *= 2
    return v.reshape(shape) * (1.0 / math.isqrt(size))


def rotate(v: torch.Tensor, block: int = ROTATION_BLOCK) -> torch.Tensor:
    """v [..., k] R in fp32 (R symmetric and orthonormal, so rotate(rotate(v)) = v up to rounding)."""
    v = v.float()
    parts, runs = [], {}
    for start, size in rotation_blocks(v.shape[-1], block):  # consecutive blocks of one size in one call
        runs.setdefault(size, [start, 0])[1] += size
    for size, (start, width) in runs.items():
        chunk = v[..., start : start + width]
        parts.append(hadamard(chunk.reshape(*chunk.shape[:-1], width // size, size), size).reshape(chunk.shape))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def check_smooth(weight: torch.Tensor, method: Method, smooth: torch.Tensor | None, stored_idx: torch.Tensor) -> torch.Tensor | None:
    """A smoothing method needs m [k], finite and positive, 1 at the stored columns; the others take none."""
    if not method.smoothing:
        if smooth is not None:
            raise InvalidArgumentError(f"method {method.name!r} takes no smoothing vector")
        return None
    if smooth is None:
        raise InvalidArgumentError(f"method {method.name!r} needs calibrated input ranges (calibrate with --calib-samples > 0)")
    smooth = torch.as_tensor(smooth, device=weight.device).float().flatten().contiguous()
    if smooth.numel() != weight.shape[1] or not bool((torch.isfinite(smooth) & (smooth > 0)).all()):
        raise InvalidArgumentError(f"smoothing vector must hold {weight.shape[1]} finite positive values")
    if stored_idx.numel() and not bool((smooth[stored_idx] == 1).all()):
        raise InvalidArgumentError("smoothing vector must be 1 at the stored outlier columns")
    return smooth


def quantize_weight(weight: torch.Tensor, method: Method, outlier_idx: torch.Tensor | None = None, smooth: torch.Tensor | None = None,
                    rotation_block: int = ROTATION_BLOCK) -> QuantizedWeight:
    """Quantize W [n, k] for a method; stored outlier columns stay exact and out of the scales.

    Smoothing methods quantize W / m (`smooth` = m); the stored columns, where m is 1, stay W.
    Rotation methods quantize W' R with R's blocks `rotation_block` wide (other methods ignore it).
    """
    check_weight(weight)
    if not method.quantized:
        raise InvalidArgumentError(f"method {method.name!r} does not quantize weights")
    idx = stored_outlier_index(weight, method, outlier_idx)
    smooth = check_smooth(weight, method, smooth, idx)
    w = smooth_weight(weight, smooth).detach().float()
    if idx.numel():
        w = w.index_fill(1, idx, 0.0)
    block = check_rotation_block(rotation_block) if method.rotation else 0
    if block:
        w = rotate(w, block)
    int8 = quantize(w, method.weight, method.zeropoint)
    return QuantizedWeight(int8, idx, weight.detach()[:, idx].contiguous(), smooth, block)


def decomposed_columns(x: torch.Tensor, method: Method, threshold: float, stored_idx: torch.Tensor) -> torch.Tensor:
    """The columns of this call that take the 16-bit path: stored outliers ∪ run-time outliers."""
    runtime = find_outlier_columns(x, threshold if method.decomposition else math.inf)
    if not stored_idx.numel():
        return runtime
    return torch.unique(torch.cat([stored_idx.to(runtime.device), runtime]))


def quantize_activations(x: torch.Tensor, method: Method, threshold: float, stored_idx: torch.Tensor, groups: int = 1,
                         rotation_block: int = ROTATION_BLOCK) -> tuple[Quantized, torch.Tensor]:
    """Quantize X [m, k] (rows from `groups` sequences) after taking out its 16-bit columns.

    Returns (int8 X, the columns that take the 16-bit path). Rotation methods quantize X' R, R's
    blocks `rotation_block` wide (the weight's).
    """
    fp_idx = decomposed_columns(x, method, threshold, stored_idx)
    x_int = x.float().index_fill(1, fp_idx, 0.0) if fp_idx.numel() else x
    if method.rotation:
        x_int = rotate(x_int, rotation_block)
    return quantize(x_int, method.activation, method.zeropoint, groups), fp_idx


def sequence_count(x: torch.Tensor) -> int:
    """How many sequences an activation tensor [..., seq, k] holds (1 for a 2-D [m, k])."""
    return x.shape[:-2].numel() if x.dim() > 2 and x.shape[-2] > 0 else 1


def int8_accumulate(qx: Quantized, qw: Quantized) -> torch.Tensor:
    """Exact int32 sums of (qx - zx)(qw - zw) over k, computed in int64 for clarity."""
    a = qx.q.long()
    b = qw.q.long()
    if qx.zero is not None:
        a = a - qx.zero.long()[:, None]
    if qw.zero is not None:
        b = b - qw.zero.long()[:, None]
    return (a @ b.T).to(torch.int32)


def unrotated_columns(qt: Quantized, columns: torch.Tensor, block: int) -> torch.Tensor:
    """Columns of dequantize(qt) R in fp32 (the int8 W of a rotation method in the original basis); only their blocks are rotated back."""
    out = torch.empty(qt.q.shape[0], columns.numel(), dtype=torch.float32, device=qt.q.device)
    for start, size in rotation_blocks(qt.q.shape[1], block):
        inside = (columns >= start) & (columns < start + size)
        if bool(inside.any()):
            block = hadamard(dequantize(qt, torch.arange(start, start + size, device=qt.q.device)), size)
            out[:, inside] = block[:, columns[inside] - start]
    return out


def outlier_weight_columns(qweight: QuantizedWeight, fp_idx: torch.Tensor) -> torch.Tensor:
    """W[:, fp_idx] in fp32: exact for stored outlier columns, dequantized int8 otherwise (rotated back for rotation methods)."""
    cols = unrotated_columns(qweight.int8, fp_idx, qweight.rotation_block) if qweight.rotation_block else dequantize(qweight.int8, fp_idx)
    stored = qweight.outlier_idx
    if stored.numel():
        is_stored = torch.isin(fp_idx, stored)
        where = torch.searchsorted(stored, fp_idx[is_stored])
        cols[:, is_stored] = qweight.outlier_weight[:, where].float()
    return cols


def each_sequence(x: torch.Tensor, method: Method, call: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply a linear call to each sequence of x [..., seq, k] when the method detects outliers.

    Run-time outlier columns are found in one sequence at a time: a column with one |x| >= threshold
    in some other sequence of the batch must not change how this one is quantized, so a sequence's
    output (and every perplexity) does not depend on what it is batched with.
    """
    if not method.decomposition or sequence_count(x) <= 1:
        return call(x)
    outputs = [call(sequence) for sequence in x.reshape(-1, *x.shape[-2:])]
    return torch.stack(outputs).reshape(*x.shape[:-1], outputs[0].shape[-1])


def linear(x: torch.Tensor, qweight: QuantizedWeight, method: Method, threshold: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Y = X W^T + b with the method's quantization, computed in fp32, returned in x's dtype."""
    return each_sequence(x, method, lambda part: linear_call(part, qweight, method, threshold, bias))


def linear_call(x: torch.Tensor, qweight: QuantizedWeight, method: Method, threshold: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """One matmul call: outliers are detected over all of x's rows (of X · m for smoothing methods)."""
    k = x.shape[-1]
    x2 = smooth_activations(x.reshape(-1, k), qweight.smooth)
    qx, fp_idx = quantize_activations(x2, method, threshold, qweight.outlier_idx, sequence_count(x), qweight.rotation_block or ROTATION_BLOCK)
    acc = int8_accumulate(qx, qweight.int8)
    out = acc.float() * (qx.scale[:, None] * qweight.int8.scale[None, :])
    if fp_idx.numel():
        out = out + x2[:, fp_idx].float() @ outlier_weight_columns(qweight, fp_idx).T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])
