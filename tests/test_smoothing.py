"""llm.int8-smooth, the tenth method: per-feature smoothing calibrated at quantize time."""

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import DATA, STORIES, needs_data, needs_stories, save_tiny, tiny_model
from llmint8_cli import Int8Linear, quantize_model
from llmint8_cli.activations import collect
from llmint8_cli.checkpoint.load import load
from llmint8_cli.checkpoint.quantize import QuantizeOptions, quantize_checkpoint
from llmint8_cli.cli import app
from llmint8_cli.core import get_method, parse_methods
from llmint8_cli.core import reference as R
from llmint8_cli.errors import InvalidArgumentError
from llmint8_cli.evaluation.variants import calibrate_on_the_fly
from llmint8_cli.nn.convert import quantizable_layers

RUNNER = CliRunner()
SMOOTH = get_method("llm.int8-smooth")
LLM_INT8 = get_method("llm.int8")


def uneven_features(m=64, k=256, n=96, seed=0):
    """Activations as SmoothQuant describes them: a few features (8 of 256) systematically large
    but below the outlier threshold (|x| < 6), the others small; a weight with normal columns."""
    g = torch.Generator().manual_seed(seed)
    ranges = torch.full((k,), 0.1)
    ranges[torch.randperm(k, generator=g)[:8]] = 2.0
    x = torch.randn(m, k, generator=g).clamp(-2.5, 2.5) * ranges
    w = torch.randn(n, k, generator=g) / k**0.5
    return x, w


def relative_error(y, x, w):
    exact = x @ w.T
    return float((y - exact).norm() / exact.norm())


def test_smoothing_is_a_reparametrization_that_removes_activation_error():
    x, w = uneven_features()
    no_stored = torch.zeros(0, dtype=torch.long)
    m = R.smoothing_factors(x.abs().amax(dim=0), w, 0.5, no_stored)
    torch.testing.assert_close((x * m) @ (w / m).T, x @ w.T, rtol=1e-5, atol=1e-5)  # the same product
    plain = relative_error(R.linear(x, R.quantize_weight(w, LLM_INT8), LLM_INT8, 6.0), x, w)
    smoothed = relative_error(R.linear(x, R.quantize_weight(w, SMOOTH, smooth=m), SMOOTH, 6.0), x, w)
    assert smoothed < 0.5 * plain, (smoothed, plain)


def test_smoothing_factors_follow_the_formula_and_keep_stored_and_empty_columns():
    w = torch.tensor([[1.0, -4.0, 0.5, 2.0], [0.25, 1.0, -0.5, 0.0]])
    x_max = torch.tensor([9.0, 4.0, 0.0, 16.0])
    m = R.smoothing_factors(x_max, w, 0.5, torch.tensor([3]))
    assert m.dtype == torch.float32
    torch.testing.assert_close(m[:2], torch.tensor([1.0 ** 0.5 / 9 ** 0.5, 4.0 ** 0.5 / 4 ** 0.5]))
    assert m[2] == 1 and m[3] == 1  # no calibrated range; a stored outlier column
    assert torch.equal(R.smoothing_factors(x_max, w, 0.0, torch.tensor([3]))[:2], w.abs().amax(0)[:2])  # alpha 0: W's range only


def test_a_smoothing_method_refuses_a_missing_or_bad_vector():
    w = torch.randn(8, 16)
    with pytest.raises(InvalidArgumentError, match="needs calibrated input ranges"):
        R.quantize_weight(w, SMOOTH)
    with pytest.raises(InvalidArgumentError, match="takes no smoothing vector"):
        R.quantize_weight(w, LLM_INT8, smooth=torch.ones(16))
    with pytest.raises(InvalidArgumentError, match="finite positive"):
        R.quantize_weight(w, SMOOTH, smooth=torch.zeros(16))
    with pytest.raises(InvalidArgumentError, match="1 at the stored outlier columns"):
        R.quantize_weight(w, SMOOTH, torch.tensor([2]), smooth=torch.full((16,), 2.0))
    with pytest.raises(InvalidArgumentError, match="needs input_max"):
        Int8Linear.from_linear(torch.nn.Linear(16, 8), "llm.int8-smooth")
    with pytest.raises(InvalidArgumentError, match="between 0 and 1"):
        Int8Linear.from_linear(torch.nn.Linear(16, 8), "llm.int8-smooth", input_max=torch.ones(16), alpha=1.5)
    with pytest.raises(InvalidArgumentError, match="needs calibrated input ranges"):
        quantize_model(tiny_model("llama"), "llm.int8-smooth")


def test_method_groups():
    assert [m.name for m in parse_methods("paper")][-1] == "llm.int8-zp" and len(parse_methods("paper")) == 9
    assert [m.name for m in parse_methods("all")][-2:] == ["llm.int8-smooth", "llm.int8-rotate"]


def planted_outlier_model(seed: int, scale: float):
    """A tiny Llama with outlier features planted without changing its function: RMSNorm weight
    channels scaled up by `scale` and the columns of the layers that read them scaled down."""
    model = tiny_model("llama", seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, readers in ((layer.input_layernorm, ("q_proj", "k_proj", "v_proj")), (layer.post_attention_layernorm, ("gate_proj", "up_proj"))):
                channels = torch.tensor([5, 21])
                norm.weight[channels] *= scale
                parent = layer.self_attn if readers[0] == "q_proj" else layer.mlp
                for name in readers:
                    getattr(parent, name).weight[:, channels] /= scale
    return model


@pytest.mark.parametrize("ours", ["llm.int8-smooth", "llm.int8-rotate"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_planted_outliers_leave_our_methods_at_least_as_good_as_llm_int8(scale, ours):
    """Each method as `quantize` makes it by default: its stored columns at its own threshold."""
    ids = torch.randint(3, 128, (4, 48), generator=torch.Generator().manual_seed(1))
    errors = {"llm.int8": 0.0, ours: 0.0}
    for seed in range(3):
        base = planted_outlier_model(seed, scale).eval()
        with torch.no_grad():
            exact = base(ids).logits
            stats = collect(base, [ids[:2]], [name for name, _ in quantizable_layers(base)], 6.0)  # calibration: other text than the evaluated
            for method in errors:
                stored = stats.outlier_columns(get_method(method).threshold_or_default(None))
                model = quantize_model(planted_outlier_model(seed, scale).eval(), method, outliers=stored, input_max=stats.col_max)
                errors[method] += float((model(ids).logits - exact).norm() / exact.norm())
    if scale > 1:
        assert errors["llm.int8"] > 0.0
    assert errors[ours] <= errors["llm.int8"] * 1.05, errors


def test_quantize_refuses_smoothing_without_calibration(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    result = RUNNER.invoke(app, ["quantize", str(src), str(tmp_path / "out"), "--method", "llm.int8-smooth", "--calib-samples", "0", "-q"])
    assert result.exit_code == 2 and result.stderr.strip() == "llmint8: error: method 'llm.int8-smooth' is calibrated: --calib-samples must be at least 1"
    assert not (tmp_path / "out").exists()


@needs_stories
@needs_data
def test_a_smoothed_folder_is_the_model_quantized_in_memory(tmp_path):
    """quantize -> load gives bit for bit the fp16 source smoothed in memory with the same calibration."""
    options = QuantizeOptions(method="llm.int8-smooth", calib_samples=4, calib_seq_len=128, calib_dataset="ptb", data_dir=str(DATA), smooth_alpha=0.6)
    out = tmp_path / "out"
    summary = quantize_checkpoint(str(STORIES), out, options)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format_version"] == 2 and config["smoothing"] == {"alpha": 0.6} and summary["method"] == "llm.int8-smooth"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        smooth = f.get_tensor(f"{config['quantized_modules'][0]}.input_smooth")
        assert smooth.dtype == torch.float32 and smooth.numel() == 64 and not torch.all(smooth == 1)
    assert_folder_is_the_model_quantized_in_memory(out, options, tmp_path)


def assert_folder_is_the_model_quantized_in_memory(out, options: QuantizeOptions, tmp_path) -> None:
    """stories260K quantized to `out` with `options` == the fp16 source quantized in memory with the
    same calibration, bit for bit, through llmint8's loader and transformers'; no bitsandbytes export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = load(out)
    fp32 = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    stats, _ = calibrate_on_the_fly(fp32, AutoTokenizer.from_pretrained(STORIES), options, None)
    in_memory = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float16).eval()
    quantize_model(in_memory, options.method, outliers=stats.outlier_columns(), input_max=stats.col_max, alpha=options.smooth_alpha,
                   rotation_block=options.rotation_block)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, in_memory(ids).logits)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(ids).logits, loaded(ids).logits)  # transformers' loader too
    result = RUNNER.invoke(app, ["export", str(out), str(tmp_path / "bnb"), "--to", "bitsandbytes", "-q"])
    assert result.exit_code == 2 and "bitsandbytes 8-bit has no such step" in result.stderr
