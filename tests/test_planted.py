"""The planted-outlier models of the fidelity benchmark (issue #47): the same function in 16-bit,
and features the paper's analysis calls systematic."""

import pytest
import torch

from conftest import tiny_model
from llmint8_cli import activations
from llmint8_cli.evaluation.planted import chosen_dims, plant
from llmint8_cli.nn.convert import as_linear, quantizable_layers


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
@pytest.mark.parametrize("place", ["attention", "mlp", "both"])
def test_planting_keeps_the_function_and_makes_systematic_features(arch, place):
    model = tiny_model(arch).double()  # float64 (Gemma's norm still multiplies in fp32): what is left is rounding
    ids = torch.randint(4, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    dims = chosen_dims(model.config.hidden_size, 2, seed=3)
    assert plant(model, dims, 60.0, place) == model.config.num_hidden_layers * (2 if place == "both" else 1)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(after, before, rtol=1e-6, atol=1e-6)  # a wrong planting moves logits by O(0.1)

    layers = dict(quantizable_layers(model))
    stats = activations.collect(model.float(), ids.split(1), list(layers), 6.0)
    report = activations.analyze(stats, {n: tuple(as_linear(m).weight.shape) for n, m in layers.items()}, 16.0)
    assert set(dims) <= set(report["systematic_features"]), report["systematic_features"]


def test_an_unknown_place_or_factor_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="place must be one of"):
        plant(model, [1], 10.0, "embeddings")
    with pytest.raises(ValueError, match="factor must be positive"):
        plant(model, [1], 0.0, "mlp")


def test_only_systematic_features_are_stored_by_the_ratio():
    """A hidden dimension standing 20x above its layer's median (under the threshold) in 2 of the 8 layers that read
    the hidden state (25 %) is stored there; one doing so in a single layer, or in an output
    projection's input, is left to the threshold."""
    stats = activations.ActivationStats(6.0, hidden_size=8)
    readers = [f"model.layers.{i}.{name}" for i in range(2) for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj")]
    for name in readers:
        stats.col_max[name] = torch.full((8,), 0.25)
    stats.col_max["model.layers.0.mlp.down_proj"] = torch.full((16,), 0.25)
    stats.col_max[readers[0]][2] = stats.col_max[readers[5]][2] = 5.0  # systematic, though under the threshold
    stats.col_max[readers[3]][5] = 5.0  # one layer only
    stats.col_max["model.layers.0.mlp.down_proj"][7] = 5.0  # not the hidden state
    stats.col_max[readers[1]][6] = 7.0  # the threshold's, ratio or not
    columns = stats.outlier_columns(6.0, 16.0)
    assert {n: c.tolist() for n, c in columns.items() if c.numel()} == {readers[0]: [2], readers[1]: [6], readers[5]: [2]}
    assert {n: c.tolist() for n, c in stats.outlier_columns(6.0).items() if c.numel()} == {readers[1]: [6]}
    assert not activations.ActivationStats(6.0).systematic_columns(16.0)  # no hidden size known: the threshold alone
    for name in readers:  # layers whose typical column is 0 (most inputs zero) have nothing to stand above
        stats.col_max[name] = torch.zeros(8)
        stats.col_max[name][2] = 1.0
    assert not any(mask.any() for mask in stats.systematic_columns(16.0).values())


def planted_folder(tmp_path):
    """A tiny Llama with 2 dims planted 60x in both places, saved in fp16 with a tokenizer; an evaluation text and a calibration text."""
    from conftest import save_tiny, tiny_tokenizer

    model = tiny_model("llama")
    dims = chosen_dims(model.config.hidden_size, 2, seed=5)
    plant(model, dims, 60.0, "both")
    src = save_tiny(model.half(), tmp_path / "src")
    tiny_tokenizer().save_pretrained(src)
    text, calibration = tmp_path / "text.txt", tmp_path / "calibration.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    calibration.write_text("A stitch in time saves nine; every cloud has a silver lining. " * 40)
    return src, dims, text, calibration


def test_the_outliers_command_shows_planted_features_and_what_each_method_stores(tmp_path):
    """`llmint8 outliers` calls the planted dims systematic by the paper's criteria and by the
    ratio, and says what the decomposition methods would store, and why."""
    import json

    from typer.testing import CliRunner

    from llmint8_cli.cli import app

    src, dims, text, _ = planted_folder(tmp_path)
    result = CliRunner().invoke(app, ["outliers", str(src), "--dataset", str(text), "--samples", "2", "--seq-len", "64", "--threshold", "1000"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["systematic_features"] == [] and sorted(report["systematic_by_ratio"]) == sorted(dims)  # under 1000, yet 60x the rest
    planted = [f for f in report["features"] if f["dim"] in dims]
    assert len(planted) == 2 and all(f["times_median"] >= 16 and f["standing_share"] == 1.0 for f in planted)
    stored = {tuple(s["methods"]): s for s in report["stored_columns"]}
    rotate, paper = stored[("llm.int8-rotate",)], stored[("rowwise+decomp", "llm.int8", "llm.int8-zp", "llm.int8-smooth")]
    assert (rotate["threshold"], rotate["outlier_ratio"], paper["outlier_ratio"]) == (60.0, 16.0, 0.0)
    layers = tiny_model("llama").config.num_hidden_layers
    assert rotate["columns"] >= 2 * 5 * layers and paper["columns"] >= rotate["columns"]  # every q/k/v and gate/up reads the planted dims
    assert "llm.int8-rotate" in result.stderr and "by the ratio 16" in result.stderr


def test_an_outlier_ratio_stores_planted_features_below_the_threshold(tmp_path):
    """Features 60 times their layer's typical column but below the threshold (here 1000) are
    stored as 16-bit columns with --outlier-ratio 16, not without, and by llm.int8-rotate at its
    default ratio; the folder records the ratio and the columns it added, eval-ppl on the fly
    computes the stored folder's perplexity, and its cache is named by the ratio."""
    import json

    from typer.testing import CliRunner

    from llmint8_cli.cli import app

    runner = CliRunner()
    src, dims, text, calibration = planted_folder(tmp_path)
    model = tiny_model("llama")
    common = ["--method", "llm.int8", "--threshold", "1000", "--calib-samples", "4", "--calib-seq-len", "64", "--calib-dataset", str(calibration)]
    stored = {}
    for ratio in ("0", "16"):
        result = runner.invoke(app, ["quantize", str(src), str(tmp_path / f"r{ratio}"), *common, "--outlier-ratio", ratio, "-q"])
        assert result.exit_code == 0, result.stderr
        stored[ratio] = json.loads(result.stdout)
    assert stored["0"]["outlier_columns_total"] == 0
    attention = stored["16"]["outlier_columns"]  # per layer: every q/k/v and gate/up reads the planted dims
    assert stored["16"]["outlier_columns_total"] >= 2 * 5 * model.config.num_hidden_layers and attention
    info = stored["16"]["calibration"]
    assert (info["outlier_ratio"], info["systematic_columns"]) == (16, stored["16"]["outlier_columns_total"])
    rotate = runner.invoke(app, ["quantize", str(src), str(tmp_path / "rotate"), *common, "--method", "llm.int8-rotate", "-q"])
    assert rotate.exit_code == 0, rotate.stderr
    assert json.loads(rotate.stdout)["outlier_columns"] == stored["16"]["outlier_columns"]  # the default ratio of llm.int8-rotate
    layer = json.loads((tmp_path / "r16" / "config.json").read_text())["quantization_config"]["calibration"]
    assert layer["outlier_ratio"] == 16
    args = ["--dataset", str(text), "--seq-len", "64", "-q"]
    folder = json.loads(runner.invoke(app, ["eval-ppl", str(tmp_path / "r16"), *args]).stdout)
    fly = runner.invoke(app, ["eval-ppl", str(src), *args, "--methods", "llm.int8", "--threshold", "1000", "--calib-samples", "4", "--calib-seq-len", "64",
                              "--calib-dataset", str(calibration), "--outlier-ratio", "16", "--cache-dir", str(tmp_path / "cache")])
    assert fly.exit_code == 0, fly.stderr
    assert "llm.int8-t1000-calib4x64-calibration.txt-ratio16-float32-cpu" in [p.name for p in (tmp_path / "cache").glob("*/*")]
    assert json.loads(fly.stdout)["results"]["llm.int8"]["calibration"]["outlier_ratio"] == 16
    assert json.loads(fly.stdout)["results"]["llm.int8"]["ppl"] == folder["results"]["llm.int8"]["ppl"]


@pytest.mark.parametrize("ratio", ["0.5", "1", "inf", "nan"])
def test_a_ratio_that_stores_no_outlier_is_refused(tmp_path, ratio):
    from typer.testing import CliRunner

    from llmint8_cli.cli import app

    for command in (["quantize", "smollm2-135m", str(tmp_path / "out")], ["eval-ppl", "smollm2-135m"]):
        result = CliRunner().invoke(app, [*command, "--outlier-ratio", ratio, "-q"])
        assert result.exit_code == 2 and "outlier ratio must be 0 (off) or a finite number above 1" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
