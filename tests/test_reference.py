"""The reference numerics against hand-computed values and the paper's definitions."""

import math

import pytest
import torch

from llmint8_cli.core import METHODS, get_method, parse_methods, check_threshold
from llmint8_cli.core import reference as R
from llmint8_cli.errors import InvalidArgumentError, InvalidWeightError


def test_absmax_rowwise_matches_hand_computation():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [3.0, 1.5, -0.75]])
    q = R.quantize(x, "row", zeropoint=False)
    assert q.q.tolist() == [[64, -127, 32], [0, 0, 0], [127, 64, -32]]
    assert torch.allclose(q.scale, torch.tensor([2 / 127, 0.0, 3 / 127]))
    assert q.zero is None


def test_absmax_tensorwise_uses_one_scale_per_sequence():
    x = torch.tensor([[1.0, -2.0], [4.0, 0.5], [10.0, 1.0], [-5.0, 2.5]])
    whole = R.quantize(x, "tensor", zeropoint=False)
    assert torch.allclose(whole.scale, torch.full((4,), 10 / 127))
    per_seq = R.quantize(x, "tensor", zeropoint=False, groups=2)
    assert torch.allclose(per_seq.scale, torch.tensor([4, 4, 10, 10]) / 127)


def test_outliers_are_detected_per_sequence():
    """An outlier in one sequence must not move another sequence's columns to the 16-bit path."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    x[0, 2, 3] = 40.0  # only sequence 0 has an outlier (column 3)
    w = torch.randn(8, 16)
    method = get_method("llm.int8")
    qw = R.quantize_weight(w, method)
    batched = R.linear(x, qw, method, 6.0)
    for i in range(2):
        assert torch.equal(batched[i], R.linear_call(x[i], qw, method, 6.0))
    # detecting over the whole batch would have taken column 3 out of sequence 1 too
    assert not torch.equal(batched[1], R.linear_call(x.reshape(-1, 16), qw, method, 6.0)[5:])


def test_zeropoint_maps_range_to_full_int8_and_zero_exactly():
    x = torch.tensor([[-1.0, 0.0, 3.0, 1.0]])
    q = R.quantize(x, "row", zeropoint=True)
    assert q.q.min() == -127 and q.q.max() == 127
    assert q.q[0, 1] == q.zero[0]  # an exact 0 maps to the zero point
    assert -127 <= int(q.zero[0]) <= 127
    back = R.dequantize(q)
    assert torch.allclose(back, x, atol=4 / 254 / 2 + 1e-6)


def test_zeropoint_is_more_accurate_than_absmax_on_asymmetric_rows():
    torch.manual_seed(0)
    x = torch.rand(64, 256) * 4 + 0.1  # all positive, like post-ReLU activations
    err_abs = (R.dequantize(R.quantize(x, "row", False)) - x).abs().mean()
    err_zp = (R.dequantize(R.quantize(x, "row", True)) - x).abs().mean()
    assert err_zp < err_abs


def test_zero_rows_give_zero_not_nan():
    x = torch.zeros(3, 5)
    for zp in (False, True):
        q = R.quantize(x, "row", zp)
        assert torch.equal(R.dequantize(q), x)


def test_outlier_columns_include_nan_and_inf():
    x = torch.tensor([[0.0, 6.0, 1.0, float("nan"), 0.0], [0.0, -1.0, -5.99, 0.0, float("-inf")]])
    assert R.find_outlier_columns(x, 6.0).tolist() == [1, 3, 4]


def test_linear_decomposition_equals_split_product():
    """llm.int8: Y = X[:,O] W[:,O]^T + dequant(int8 part), with O = columns holding |x| >= 6."""
    torch.manual_seed(1)
    w = torch.randn(16, 24)
    x = torch.randn(5, 24)
    x[2, 7] = 9.0
    method = get_method("llm.int8")
    qw = R.quantize_weight(w, method)
    y = R.linear(x, qw, method, 6.0)
    outliers = torch.tensor([7])
    x_rest = x.index_fill(1, outliers, 0.0)
    qx = R.quantize(x_rest, "row", False)
    expected = R.dequantize(qx) @ R.dequantize(qw.int8).T + x[:, outliers] @ R.dequantize(qw.int8, outliers).T
    assert torch.allclose(y, expected, atol=1e-5)
    exact = x @ w.T
    assert (y - exact).abs().max() < 0.1 * exact.abs().max()


def test_stored_outlier_columns_are_exact_and_out_of_the_scales():
    torch.manual_seed(2)
    w = torch.randn(8, 12)
    w[:, 4] *= 100  # a huge column would dominate every row scale
    method = get_method("llm.int8")
    qw = R.quantize_weight(w, method, outlier_idx=torch.tensor([4]))
    assert torch.equal(qw.outlier_weight[:, 0], w[:, 4])
    assert torch.all(qw.int8.q[:, 4] == 0)
    assert torch.allclose(qw.int8.scale, w.index_fill(1, torch.tensor([4]), 0).abs().amax(1) / 127)
    x = torch.randn(3, 12)
    x[:, 4] = 7.0
    err_stored = (R.linear(x, qw, method, 6.0) - x @ w.T).abs().max()
    err_runtime = (R.linear(x, R.quantize_weight(w, method), method, 6.0) - x @ w.T).abs().max()
    assert err_stored < err_runtime / 5


def test_nan_and_inf_propagate_like_the_16bit_layer():
    torch.manual_seed(3)
    w = torch.randn(6, 10)
    x = torch.randn(4, 10)
    x[1, 2] = float("nan")
    x[3, 5] = float("inf")
    for name in METHODS:
        method = get_method(name)
        if not method.quantized:
            continue
        ranges = torch.nan_to_num(x.abs(), nan=0.0, posinf=0.0).amax(dim=0)
        smooth = R.smoothing_factors(ranges, w, 0.5, torch.zeros(0, dtype=torch.long)) if method.smoothing else None
        y = R.linear(x, R.quantize_weight(w, method, smooth=smooth), method, 6.0)
        assert torch.isnan(y[1]).all()
        assert not torch.isfinite(y[3]).any()
        assert torch.isfinite(y[[0, 2]]).all(), name


def test_only_the_rotation_moves_the_default_threshold():
    """The paper's nine and llm.int8-smooth keep 6.0; llm.int8-rotate needs 16-bit only for extreme features."""
    defaults = {name: method.threshold_or_default(None) for name, method in METHODS.items()}
    assert defaults.pop("llm.int8-rotate") == 60.0 and set(defaults.values()) == {6.0}
    assert get_method("llm.int8-rotate").threshold_or_default(6) == 6.0 and get_method("llm.int8").threshold_or_default(20.0) == 20.0
    with pytest.raises(InvalidArgumentError, match="positive finite"):
        get_method("llm.int8-rotate").threshold_or_default(-1.0)


def test_bad_inputs_raise_typed_errors():
    with pytest.raises(InvalidArgumentError, match="unknown method"):
        get_method("int4")
    for bad in (0, -1.0, math.nan, math.inf):
        with pytest.raises(InvalidArgumentError):
            check_threshold(bad)
    with pytest.raises(InvalidWeightError):
        R.quantize_weight(torch.ones(4, 4, dtype=torch.int32), get_method("llm.int8"))
    with pytest.raises(InvalidWeightError):
        R.quantize_weight(torch.ones(4), get_method("llm.int8"))
    with pytest.raises(InvalidWeightError, match="NaN or Inf"):
        R.quantize_weight(torch.tensor([[1.0, float("inf")]]), get_method("llm.int8"))
    with pytest.raises(InvalidArgumentError, match="out of range"):
        R.quantize_weight(torch.ones(2, 3), get_method("llm.int8"), torch.tensor([3]))


def test_method_table_has_the_nine_methods_of_table_1_then_ours():
    assert list(METHODS) == ["fp16", "absmax", "zeropoint", "rowwise", "vectorwise", "zp-vectorwise", "rowwise+decomp", "llm.int8", "llm.int8-zp", "llm.int8-smooth", "llm.int8-rotate"]
    assert [m.name for m in parse_methods("llm.int8,absmax,llm.int8")] == ["llm.int8", "absmax"]
    assert len(parse_methods("paper")) == 9 and len(parse_methods("all")) == 11
