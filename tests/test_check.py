"""The check a converted model passes before anything is committed (nn/check.py): faults named,
healthy conversions of every method passed, and quantize / on-the-fly evaluation / export refusing
what fails it, nothing written."""

import contextlib
import copy
import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from conftest import save_tiny, tiny_model, tiny_tokenizer
from llmint8_cli.activations import collect
from llmint8_cli.cli import app
from llmint8_cli.core.methods import METHODS
from llmint8_cli.errors import ConversionError
from llmint8_cli.nn.check import check_conversion, originals_in
from llmint8_cli.nn.convert import quantizable_layers, quantize_model
from llmint8_cli.nn.experts import unfuse_experts
from test_architectures import Doubled, ReadsWeightDirectly, planted

RUNNER = CliRunner()
IDS = (torch.arange(64) * 7 % 120 + 3)[None]


class CastsWeight(ReadsWeightDirectly):
    """Reads the layer's weight and casts it to its input's dtype: int8 rows taken for values, silently."""

    def forward(self, x):
        return (self.act_fn(self.gate_proj(x)) * self.up_proj(x)) @ self.down_proj.weight.t().to(x.dtype)


def with_mlp(kind):
    def plant(model):
        model.model.layers[0].mlp = kind(model.model.layers[0].mlp)
    return plant


def with_doubled_o_proj(model):
    model.model.layers[1].self_attn.o_proj = planted(model.model.layers[1].self_attn.o_proj, Doubled)


FAULTS = {  # every layer converted, the probe's verdicts ignored: what the check alone must find
    "reads the weight, raises": ("llama", with_mlp(ReadsWeightDirectly), "model.layers.0.mlp.down_proj", "raises RuntimeError"),
    "reads the weight, silently": ("llama", with_mlp(CastsWeight), "model.layers.0.mlp.down_proj", "differs from the 16-bit block by"),
    "own forward": ("llama", with_doubled_o_proj, "model.layers.1.self_attn.o_proj", "its forward (Doubled) is not its linear map"),
    "Mamba's dt_proj": ("mamba", None, "backbone.layers.0.mixer.dt_proj", "raises RuntimeError"),
    "PhiMoE's router": ("phimoe", None, "model.layers.0.mlp.router", "returns tuple, not its linear map"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_is_named_with_its_layer_and_the_skip_that_keeps_it_16_bit(fault):
    arch, plant, layer, words = FAULTS[fault]
    base = tiny_model(arch, outlier_scale=20.0)
    if plant:
        plant(base)
    unfuse_experts(base)
    converted = quantize_model(copy.deepcopy(base), "llm.int8", kept={})
    with pytest.raises(ConversionError) as raised:
        check_conversion(converted, originals_in(base, converted), IDS)
    message = str(raised.value)
    pattern = layer.replace(".0.", ".*.").replace(".1.", ".*.")
    assert message.startswith(f"{layer}: the converted model fails its check") and words in message, message
    assert message.endswith(f"`llmint8 quantize --skip '{pattern}'` keeps it 16-bit")


@pytest.mark.parametrize("method", [name for name, method in METHODS.items() if method.quantized])
def test_every_method_passes_on_planted_outliers_and_reports_how_close_it_is(method):
    base = tiny_model("llama", outlier_scale=20.0)
    stats = collect(base, [IDS], [name for name, _ in quantizable_layers(base)], 6.0)
    spec = METHODS[method]
    converted = quantize_model(copy.deepcopy(base), method, outliers=stats.outlier_columns(spec.threshold_or_default(None)), input_max=stats.col_max)
    report = check_conversion(converted, originals_in(base, converted), IDS)
    assert report["tokens"] == 64 and report["blocks"] == 2
    assert 0 < report["logits_relative_error"] < 0.5 and 0.5 <= report["top1_agreement"] <= 1
    if spec.decomposition:  # the outliers in 16-bit: close
        assert report["logits_relative_error"] < 0.05, report
    if method in ("vectorwise", "llm.int8"):  # row-wise activations: the check's two rows are the two models run alone
        with torch.no_grad():
            ours, sixteen_bit = converted(IDS).logits, base(IDS).logits
        assert report["logits_relative_error"] == pytest.approx(float((ours - sixteen_bit).norm() / sixteen_bit.norm()), abs=1e-5)  # rounded to 5 places


@pytest.fixture
def mamba_folder(tmp_path):
    src = save_tiny(tiny_model("mamba", outlier_scale=20.0).half(), tmp_path / "src")
    tiny_tokenizer().save_pretrained(src)
    return src


def blind_probe(monkeypatch):
    """The probe that keeps Mamba's dt_proj 16-bit sees nothing: the check alone stands."""
    from llmint8_cli.checkpoint import quantize
    from llmint8_cli.evaluation import variants
    from llmint8_cli.nn import probe

    monkeypatch.setattr(quantize, "watching", lambda model, layers: contextlib.nullcontext(SimpleNamespace(reasons={})))
    monkeypatch.setattr(variants, "linear_use", lambda model, layers: {})
    monkeypatch.setattr(probe, "linear_use", lambda model, layers: {})


def test_quantize_writes_nothing_that_fails_its_check(mamba_folder, tmp_path, monkeypatch):
    blind_probe(monkeypatch)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = RUNNER.invoke(app, ["quantize", str(mamba_folder), str(tmp_path / "out"), "--calib-samples", "0", "-q"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{tmp_path / 'out'} not written: backbone.layers.0.mixer.dt_proj: the converted model fails its check" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no OUT, no temporary folder left


def test_an_evaluation_on_the_fly_stops_at_a_conversion_that_fails_its_check(mamba_folder, tmp_path, monkeypatch):
    blind_probe(monkeypatch)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    result = RUNNER.invoke(app, ["eval-ppl", str(mamba_folder), "--dataset", str(text), "--seq-len", "64", "--methods", "fp16,llm.int8", "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith("llmint8: error: backbone.layers.0.mixer.dt_proj: the converted model fails its check")


def test_quantize_reports_the_check_of_what_it_wrote(mamba_folder, tmp_path):
    result = RUNNER.invoke(app, ["quantize", str(mamba_folder), str(tmp_path / "out"), "--calib-samples", "2", "--calib-seq-len", "64", "-q"])
    assert result.exit_code == 0, result.stderr
    check = json.loads(result.stdout)["check"]
    assert check["tokens"] == 64 and check["text"] == "calibration text" and check["blocks"] == 2
    assert check["largest_block_error"]["block"].startswith("backbone.layers.") and check["logits_relative_error"] < 0.1


def test_generation_on_the_fly_stops_at_a_conversion_that_fails_its_check(mamba_folder, monkeypatch):
    blind_probe(monkeypatch)
    monkeypatch.setattr("transformers.GenerationMixin.generate", lambda *a, **k: pytest.fail("generation started"))
    result = RUNNER.invoke(app, ["generate", str(mamba_folder), "The quick", "--max-new-tokens", "2", "-q"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "backbone.layers.0.mixer.dt_proj: the converted model fails its check" in result.stderr
