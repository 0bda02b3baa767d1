"""Every architecture users bring, end to end on a tiny random model with planted outlier features:
quantize (calibrated) -> load == from_pretrained bit for bit -> eval-ppl -> generate -> a
bitsandbytes export that plain transformers + bitsandbytes load (or a one-line refusal)."""

import importlib.util
import json
import math

import pytest
import torch
from typer.testing import CliRunner

import llmint8_cli
from conftest import ARCHITECTURES, LINEAR_MISUSE, MORE_ARCHITECTURES, save_tiny, tiny_model, tiny_tokenizer
from llmint8_cli.cli import app
from llmint8_cli.nn.linear import Int8Linear

RUNNER = CliRunner()
TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. Every cloud has a silver lining.\n"
    "Large language models keep a few hidden features far larger than the rest; LLM.int8() keeps them in 16-bit.\n"
) * 12
EXPERTS_INT8 = {"mixtral", "qwen2_moe", "phimoe", "qwen3_moe", "granitemoe", "deepseek_v2", "deepseek_v3", "jamba", "gpt_oss", "llama4_text"}  # bitsandbytes keeps 3-D experts 16-bit
BITSANDBYTES_REFUSES = {"falcon": "FalconLinear", **{name: "3-D tensor" for name in EXPERTS_INT8}}  # transformers + bitsandbytes replace exact nn.Linear only
ROUTERS = {"mixtral": {"model.layers.*.mlp.gate"}, "qwen2_moe": {"model.layers.*.mlp.gate"}, "phimoe": {"model.layers.*.mlp.router"},  # what may stay 16-bit unasked
           "qwen3_moe": {"model.layers.*.mlp.gate"}, "deepseek_v2": {"model.layers.*.mlp.gate"}, "deepseek_v3": {"model.layers.*.mlp.gate"},
           "granitemoe": {"model.layers.*.block_sparse_moe.router"},
           "jamba": {"model.layers.*.mamba", "model.layers.*.mamba.conv1d", "model.layers.*.mamba.dt_proj", "model.layers.*.feed_forward.router"},
           "llama4_text": {"model.layers.*.feed_forward.router"}, "gpt_oss": {"model.layers.*.mlp.router"},
           "mamba": {"backbone.layers.*.mixer", "backbone.layers.*.mixer.conv1d", "backbone.layers.*.mixer.dt_proj"}}
KEPT_BECAUSE = {"phimoe": "its forward (PhimoeTopKRouter) returns tuple, not its linear map", "mamba": "MambaMixer reads its weight directly, not through the layer"}


def run(*args) -> dict:
    result = RUNNER.invoke(app, [*map(str, args), "-q"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.mark.parametrize("arch", [*ARCHITECTURES, *LINEAR_MISUSE, *MORE_ARCHITECTURES, "llama-bf16"])
def test_architecture_end_to_end(tmp_path, text_file, arch):
    from transformers import AutoModelForCausalLM

    name, dtype = ("llama", torch.bfloat16) if arch == "llama-bf16" else (arch, torch.float16)
    src = save_tiny(tiny_model(name, outlier_scale=20.0).to(dtype), tmp_path / "src")
    tiny_tokenizer().save_pretrained(src)
    out = tmp_path / "int8"
    summary = run("quantize", src, out, "--calib-samples", "4", "--calib-seq-len", "64", "--calib-dataset", text_file)
    assert summary["dtype"] == str(dtype).removeprefix("torch.") and set(summary["parameters"]["kept_16bit"]) == ROUTERS.get(name, set())
    assert name not in EXPERTS_INT8 or summary["parameters"]["int8_share"] > 0.7  # the experts are int8
    if name in KEPT_BECAUSE:  # a linear layer the model does not use as one stays 16-bit, named with the reason, in the JSON and the folder
        kept = {pattern: entry["reason"] for pattern, entry in summary["parameters"]["kept_16bit"].items() if entry["reason"] != "not a linear layer"}
        assert set(kept.values()) == {KEPT_BECAUSE[name]}
        block = json.loads((out / "config.json").read_text())["quantization_config"]
        assert set(block["kept_16bit"].values()) == {KEPT_BECAUSE[name]} and not set(block["kept_16bit"]) & set(block["quantized_modules"])

    ours, theirs = llmint8_cli.load(out), AutoModelForCausalLM.from_pretrained(out)
    assert any(isinstance(m, Int8Linear) for m in theirs.modules())
    mine, other = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == other.keys() and all(mine[k].dtype == other[k].dtype and torch.equal(mine[k], other[k]) for k in mine)
    for (key, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers()):  # non-persistent ones (rotary tables) too
        assert a.dtype == b.dtype and torch.equal(a, b), key
    ids = torch.tensor([[1, 40, 72, 69, 4, 85, 89, 73, 67, 75]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)

    evaluated = run("eval-ppl", out, "--dataset", text_file, "--seq-len", "64", "--batch-size", "4")["results"]
    assert math.isfinite(evaluated["llm.int8"]["ppl"]) and abs(evaluated["llm.int8"]["delta_pct"]) < 1.0, evaluated

    generated = run("generate", out, "The quick", "--max-new-tokens", "4")
    assert generated["new_tokens"] >= 1 and generated["method"] == "llm.int8"

    exported = RUNNER.invoke(app, ["export", str(out), str(tmp_path / "bnb"), "-q"])
    if name in BITSANDBYTES_REFUSES:
        assert exported.exit_code == 2 and exported.stderr.count("\n") == 1 and BITSANDBYTES_REFUSES[name] in exported.stderr
        return
    assert exported.exit_code == 0, exported.stderr
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("the export's load needs bitsandbytes (a peer: pip install 'llmint8[peers]')")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "bnb", device_map="cpu")
    quantized = json.loads((out / "config.json").read_text())["quantization_config"]["quantized_modules"]
    assert {type(plain.get_submodule(layer)).__name__ for layer in quantized} == {"Linear8bitLt"}
    with torch.no_grad():
        a, b = ours(ids).logits.float(), plain(ids).logits.float()
    assert torch.isfinite(b).all() and (a - b).norm() / a.norm() < 0.05


@pytest.fixture
def int8_and_bitsandbytes(tmp_path, text_file):
    src = save_tiny(tiny_model("llama", outlier_scale=20.0).half(), tmp_path / "src")
    tiny_tokenizer().save_pretrained(src)
    run("quantize", src, tmp_path / "int8", "--calib-samples", "0")
    run("export", tmp_path / "int8", tmp_path / "bnb")
    return tmp_path / "int8", tmp_path / "bnb"


@pytest.mark.parametrize(
    ("command", "folder", "options", "words"),
    [
        ("quantize", "bnb", ["--method", "llm.int8-rotate", "--threshold", "3"], "bitsandbytes 8-bit folder, converted with its int8 rows kept as they are: --method, --threshold cannot apply"),
        ("quantize", "bnb", ["--calib-samples", "2"], "--calib-samples cannot apply"),
        ("eval-ppl", "int8", ["--methods", "vectorwise", "--threshold", "3"], "evaluated as stored: --methods, --threshold cannot apply"),
        ("eval-ppl", "int8", ["--calib-samples", "4"], "--calib-samples cannot apply"),
        ("eval-zeroshot", "bnb", ["--methods", "llm.int8-zp"], "--methods cannot apply"),
        ("generate", "int8", ["--method", "vectorwise"], "run as stored: --method cannot apply"),
    ],
)
def test_options_a_quantized_source_leaves_no_room_for_are_refused(int8_and_bitsandbytes, tmp_path, command, folder, options, words):
    int8, bnb = int8_and_bitsandbytes
    source = int8 if folder == "int8" else bnb
    extra = {"quantize": [tmp_path / "out"], "generate": ["The quick"]}.get(command, [])
    result = RUNNER.invoke(app, [command, str(source), *map(str, extra), *options, "-q"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and words in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_bitsandbytes_folder_has_no_baseline_never_the_working_directorys(int8_and_bitsandbytes, text_file, tmp_path, monkeypatch):
    """Its config records no 16-bit source; an empty one used to resolve to the working directory."""
    int8, bnb = int8_and_bitsandbytes
    monkeypatch.chdir(tmp_path / "src")  # a folder holding another model
    document = run("eval-ppl", bnb, "--dataset", text_file, "--seq-len", "64")
    assert list(document["results"]) == ["llm.int8"] and document["results"]["llm.int8"]["delta_pct"] is None
    assert any("records no 16-bit source" in note for note in document["notes"])
    assert list(run("eval-ppl", int8, "--dataset", text_file, "--seq-len", "64", "--methods", "llm.int8")["results"]) == ["fp16", "llm.int8"]
    timed = run("bench", bnb, "--prompt-tokens", "16", "--batch", "1", "--new-tokens", "2", "--repeat", "1")  # timed alone: no ratio, no peer
    assert list(timed["results"]) == ["llm.int8"] and "speedup" not in timed["results"]["llm.int8"]["prefill"]["16"]
    assert any("no 16-bit model: no ratios, and no peers" in note for note in timed["notes"])


def test_mixture_of_experts_evaluated_on_the_fly_quantizes_the_experts(tmp_path, text_file):
    src = save_tiny(tiny_model("mixtral", outlier_scale=20.0), tmp_path / "src")
    tiny_tokenizer().save_pretrained(src)
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(TEXT[::-1])  # never the evaluation text
    result = RUNNER.invoke(app, ["eval-ppl", str(src), "--dataset", str(text_file), "--seq-len", "64", "--calib-samples", "2", "--calib-seq-len", "64",
                                 "--calib-dataset", str(calibration)])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["parameters"]["int8_share"] > 0.8 and set(document["parameters"]["kept_16bit"]) == {"model.layers.*.mlp.gate"}
    assert abs(document["results"]["llm.int8"]["delta_pct"]) < 1.0
    assert "llmint8: warning: kept in 16-bit: model.layers.*.mlp.gate (" in result.stderr and "% of parameters: not a linear layer)" in result.stderr


@pytest.mark.parametrize("arch", sorted(EXPERTS_INT8))
def test_experts_as_a_linear_layer_each_compute_what_transformers_computes(arch):
    """unfuse_experts is the 16-bit side of every check and calibration: it must be the same function."""
    from llmint8_cli.nn.experts import LinearExperts, unfuse_experts

    model = tiny_model(arch, outlier_scale=20.0)
    ids = torch.tensor([[1, 40, 72, 69, 4, 85, 89, 73, 67, 75, 3, 99, 12, 7]])
    with torch.no_grad():
        fused = model(ids).logits
        assert unfuse_experts(model) >= 1 and any(isinstance(m, LinearExperts) for m in model.modules())
        unfused = model(ids).logits
        experts = [m for m in model.modules() if isinstance(m, LinearExperts)]
        for layer in experts[0].gate_up_proj:  # the experts take part: without them the logits move
            layer.weight.zero_()
        without = model(ids).logits
    torch.testing.assert_close(unfused, fused, rtol=1e-5, atol=1e-6)
    assert (without - fused).abs().max() > 1e-4


def test_a_mistyped_model_name_suggests_the_offline_one_first():
    result = RUNNER.invoke(app, ["eval-ppl", "smolm2-135m", "-q"])
    assert result.exit_code == 2 and "did you mean smollm2-135m, SmolLM2-135M" in result.stderr


class ReadsWeightDirectly(torch.nn.Module):
    """An MLP that computes its output projection itself, from the layer's weight (as Mamba's mixer does with dt_proj)."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn

    def forward(self, x):
        return (self.act_fn(self.gate_proj(x)) * self.up_proj(x)) @ self.down_proj.weight.t()


class Doubled(torch.nn.Linear):
    """An nn.Linear subclass whose own forward is not its linear map."""

    def forward(self, x):
        return 2 * super().forward(x)


class SameMap(torch.nn.Linear):
    """An nn.Linear subclass whose own forward is its linear map (as FalconLinear's): converted."""

    def forward(self, x):
        return x @ self.weight.t() + self.bias


def planted(linear, kind):
    layer = kind(linear.in_features, linear.out_features, bias=True)
    layer.load_state_dict({"weight": linear.weight, "bias": torch.zeros(linear.out_features)})
    return layer


def test_layers_the_model_does_not_use_as_linear_layers_stay_16_bit_and_are_named():
    from llmint8_cli import quantize_model
    from llmint8_cli.nn.convert import parameter_report

    model = tiny_model("llama", outlier_scale=20.0)
    layers = model.model.layers
    layers[0].mlp = ReadsWeightDirectly(layers[0].mlp)
    layers[1].self_attn.o_proj = planted(layers[1].self_attn.o_proj, Doubled)
    layers[1].self_attn.q_proj = planted(layers[1].self_attn.q_proj, SameMap)
    ids = torch.tensor([[1, 40, 72, 69, 4, 85, 89, 73, 67, 75]])
    with torch.no_grad():
        before = model(ids).logits
    quantize_model(model, "llm.int8")
    assert model.llmint8_kept_16bit == {"model.layers.0.mlp.down_proj": "ReadsWeightDirectly reads its weight directly, not through the layer",
                                        "model.layers.1.self_attn.o_proj": "its forward (Doubled) is not its linear map"}
    assert type(layers[0].mlp.down_proj) is torch.nn.Linear and type(layers[1].self_attn.o_proj) is Doubled
    assert isinstance(layers[1].self_attn.q_proj, Int8Linear) and isinstance(layers[0].mlp.gate_proj, Int8Linear)
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).norm() / before.norm() < 0.05
    report = parameter_report(model, [m for m in model.modules() if isinstance(m, Int8Linear)], model.llmint8_kept_16bit)
    assert {name: entry["reason"] for name, entry in report["kept_16bit"].items()} == {
        "model.layers.*.mlp.down_proj": "ReadsWeightDirectly reads its weight directly, not through the layer",
        "model.layers.*.self_attn.o_proj": "its forward (Doubled) is not its linear map"}


def test_a_tensor_the_checkpoint_lacks_is_named_with_the_architecture_that_needs_it(tmp_path):
    from safetensors.torch import load_file, save_file

    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    result = RUNNER.invoke(app, ["quantize", str(src), str(tmp_path / "out"), "--calib-samples", "0", "-q"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
    assert "no tensor for model.layers.1.mlp.up_proj.weight, which LlamaForCausalLM (llama) needs" in result.stderr
