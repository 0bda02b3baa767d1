"""Interop: transformers loads llmint8 folders, bitsandbytes both ways, pipes, the CLI basics."""

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import llmint8_cli
from conftest import ROOT, STORIES, needs_data, needs_stories, save_tiny, tiny_model
from llmint8_cli import Int8Linear, quantize_model
from llmint8_cli.checkpoint import bitsandbytes, format as fmt
from llmint8_cli.checkpoint.manifest import MANIFEST
from llmint8_cli.checkpoint.hf_quantizer import attach
from llmint8_cli.checkpoint.quantize import QuantizeOptions, quantize_checkpoint
from llmint8_cli.cli import app
from llmint8_cli.cli.common import model_from_stdin
from llmint8_cli.errors import CheckpointError, InvalidArgumentError
from llmint8_cli.nn.convert import quantizable_layers

RUNNER = CliRunner()
IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
LLMINT8 = [sys.executable, "-m", "llmint8_cli"]


def llmint8(*args, stdin=subprocess.DEVNULL, input=None):
    """The installed command line in a process of its own (real stdin, stdout and stderr)."""
    return subprocess.run([*LLMINT8, *args], cwd=ROOT.parent, stdin=None if input is not None else stdin, input=input, capture_output=True, text=True, timeout=600)


def saved_with_uneven_outliers(folder: Path) -> tuple[Path, torch.nn.Module]:
    """A tiny Llama quantized in memory with a different number of stored columns per layer, then saved."""
    model = tiny_model("llama", outlier_scale=40.0).half()
    names = [name for name, _ in quantizable_layers(model)]
    outliers = {name: torch.arange(0, 2 * (i % 4), 2) for i, name in enumerate(names)}
    quantize_model(model, "llm.int8", outliers=outliers)
    attach(model, fmt.quantization_config("llm.int8", 6.0, [], names, torch.float16, {"samples": 0}))
    model.save_pretrained(folder)
    return folder, model


def test_transformers_loads_llmint8_folders_bit_identically(tmp_path):
    from transformers import AutoModelForCausalLM

    folder, in_memory = saved_with_uneven_outliers(tmp_path / "saved")
    assert (folder / MANIFEST).is_file()  # save_pretrained wrote a folder load() accepts
    ours = llmint8_cli.load(folder, dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu")
    counts = {n: m.outlier_idx.numel() for n, m in theirs.named_modules() if isinstance(m, Int8Linear)}
    assert len(set(counts.values())) == 4 and counts == {n: m.outlier_idx.numel() for n, m in ours.named_modules() if isinstance(m, Int8Linear)}
    for name, tensor in theirs.state_dict().items():
        assert tensor.dtype == ours.state_dict()[name].dtype and torch.equal(tensor, ours.state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(theirs(IDS).logits, ours(IDS).logits)
    as_stored = llmint8_cli.load(folder).state_dict()
    assert all(torch.equal(tensor, as_stored[name]) for name, tensor in in_memory.state_dict().items())
    stored = AutoModelForCausalLM.from_pretrained(folder)  # default dtype: as stored, scales stay fp32
    layer = stored.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Int8Linear) and layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    theirs.save_pretrained(tmp_path / "again")  # a model transformers loaded saves a valid folder too
    with torch.no_grad():
        assert torch.equal(llmint8_cli.load(tmp_path / "again", dtype=torch.float32)(IDS).logits, ours(IDS).logits)


def test_plain_transformers_without_llmint8_warns_that_it_skips_the_quantization(tmp_path):
    folder, _ = saved_with_uneven_outliers(tmp_path / "saved")
    script = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(folder)!r})"
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "warning"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0 and "Unknown quantization type, got llmint8" in result.stderr and "outlier_idx" in result.stderr


def test_importing_llmint8_does_not_import_the_quantizer_registry():
    script = "import sys, llmint8_cli; assert 'transformers.quantizers.auto' not in sys.modules; from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as m; print(m['llmint8'].__name__)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT.parent)
    assert result.returncode == 0 and result.stdout.strip() == "LLMInt8HfQuantizer", result.stderr


def test_tied_weights_are_stored_and_counted_once(tmp_path):
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    src = save_tiny(model, tmp_path / "src")
    summary = quantize_checkpoint(str(src), tmp_path / "out", QuantizeOptions(calib_samples=0))
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    embedding_bytes = 128 * 32 * 2
    linear_bytes = sum(m.weight.numel() * 2 for _, m in quantizable_layers(model))
    assert summary["fp16_size_bytes"] == embedding_bytes + linear_bytes + sum(p.numel() * 2 for n, p in model.named_parameters() if "norm" in n)
    loaded = llmint8_cli.load(tmp_path / "out")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (a peer: pip install 'llmint8[peers]')")


@needs_bnb
def test_export_to_bitsandbytes_loads_in_transformers_and_comes_back_unrounded(tmp_path):
    from transformers import AutoModelForCausalLM

    folder, _ = saved_with_uneven_outliers(tmp_path / "ours")
    result = RUNNER.invoke(app, ["export", str(folder), str(tmp_path / "bnb"), "--to", "bitsandbytes", "-q"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["command"] == "export" and summary["outlier_columns_merged"] > 0
    config = json.loads((tmp_path / "bnb" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_8bit"] and config["llm_int8_threshold"] == 6.0 and "lm_head" in config["llm_int8_skip_modules"]
    ours = llmint8_cli.load(folder, dtype=torch.float32)
    name = "model.layers.0.mlp.gate_proj"  # the fifth layer: 0 stored columns, so bit-for-bit the same rows
    with safe_open(str(tmp_path / "bnb" / "model.safetensors"), "pt") as f:
        layer = ours.get_submodule(name)
        assert layer.outlier_idx.numel() == 0
        assert torch.equal(f.get_tensor(f"{name}.weight"), layer.weight) and torch.allclose(f.get_tensor(f"{name}.SCB"), layer.weight_scale * 127)
        assert f.get_tensor(f"{name}.weight_format").dtype == torch.uint8
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "bnb", device_map="cpu", dtype=torch.float32)
    assert type(theirs.get_submodule(name)).__name__ == "Linear8bitLt"
    with torch.no_grad():
        a, b = ours(IDS).logits, theirs(IDS).logits
    assert ((a - b).norm() / a.norm()) < 0.05
    back = RUNNER.invoke(app, ["quantize", str(tmp_path / "bnb"), str(tmp_path / "back"), "-q"])
    assert back.exit_code == 0, back.stderr
    with safe_open(str(tmp_path / "bnb" / "model.safetensors"), "pt") as f, safe_open(str(tmp_path / "back" / "model.safetensors"), "pt") as g:
        for layer_name in fmt.read_quantization_config(tmp_path / "back")["quantized_modules"]:
            assert torch.equal(f.get_tensor(f"{layer_name}.weight"), g.get_tensor(f"{layer_name}.weight"))
            assert torch.equal(f.get_tensor(f"{layer_name}.SCB") / 127, g.get_tensor(f"{layer_name}.weight_scale"))
    again = RUNNER.invoke(app, ["export", str(folder), str(tmp_path / "bnb"), "-q"])
    assert again.exit_code == 2 and "--force" in again.stderr


@needs_bnb
def test_a_folder_bitsandbytes_wrote_converts_and_evaluates(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    written = AutoModelForCausalLM.from_pretrained(src, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
    written.save_pretrained(tmp_path / "bnb")
    assert bitsandbytes.is_bitsandbytes_8bit(tmp_path / "bnb")
    summary = quantize_checkpoint(str(tmp_path / "bnb"), tmp_path / "ours", QuantizeOptions())
    assert summary["from"] == "bitsandbytes" and summary["quantized_layers"] == 14
    ours = llmint8_cli.load(tmp_path / "ours")
    layer = ours.model.layers[1].self_attn.o_proj
    with safe_open(str(tmp_path / "bnb" / "model.safetensors"), "pt") as f:
        assert torch.equal(layer.weight, f.get_tensor("model.layers.1.self_attn.o_proj.weight"))


def test_export_refuses_what_bitsandbytes_cannot_hold(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    quantize_checkpoint(str(src), tmp_path / "zp", QuantizeOptions(method="llm.int8-zp", calib_samples=0))
    with pytest.raises(CheckpointError, match="zero points"):
        bitsandbytes.export(str(tmp_path / "zp"), str(tmp_path / "bnb"))
    with pytest.raises(CheckpointError, match="not an llmint8 checkpoint"):
        bitsandbytes.export(str(src), str(tmp_path / "bnb"))
    assert not (tmp_path / "bnb").exists()


@pytest.mark.parametrize(("text", "words"), [
    ("", "stdin is empty"), ("not json", "not JSON"), ("[1, 2]", "no \"command\" field"), ('{"command": "bench", "model": null}', "names no model"),
])
def test_bad_stdin_documents(text, words):
    with pytest.raises(InvalidArgumentError, match=words):
        model_from_stdin(text)


def test_stdin_documents_hand_on_their_model():
    assert model_from_stdin(json.dumps({"command": "quantize", "model": "out/s", "output": "out/s", "source": "x"})) == "out/s"
    assert model_from_stdin(json.dumps({"command": "eval-ppl", "model": "smollm2-135m"})) == "smollm2-135m"


def test_a_pipe_that_is_not_an_llmint8_document_is_one_line_and_exit_2():
    result = llmint8("eval-ppl", "--dataset", "ptb", input="hello\n")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("llmint8: error: stdin is not an llmint8 JSON document")


def test_version_help_examples_and_exit_codes():
    assert RUNNER.invoke(app, ["--version"]).stdout.strip() == f"llmint8 {llmint8_cli.__version__}"
    for name in ("quantize", "eval-ppl", "eval-zeroshot", "bench", "outliers", "generate", "export"):
        shown = RUNNER.invoke(app, [name, "-h"], terminal_width=200)
        assert shown.exit_code == 0 and "Example: llmint8" in shown.stdout and "Exit codes: 0 success" in shown.stdout, name


@needs_stories
@needs_data
def test_the_users_pipeline_quantize_eval_ppl_eval_zeroshot(tmp_path):
    out = tmp_path / "stories-int8"
    line = (f"{' '.join(LLMINT8)} quantize {STORIES} {out} --calib-samples 2 --calib-dataset ptb -q"
            f" | {' '.join(LLMINT8)} eval-ppl --dataset ptb --max-tokens 1500 --seq-len 128 -q"
            f" | {' '.join(LLMINT8)} eval-zeroshot --tasks piqa --limit 6")
    result = subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=ROOT.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["command"] == "eval-zeroshot" and document["model"] == str(out)
    assert set(document["tasks"]["piqa"]) == {"fp16", "llm.int8"}
    assert f"model from stdin: {out}" in result.stderr and "fatal: not a git repository" not in result.stderr


@needs_stories
def test_generate_is_deterministic_when_greedy(tmp_path):
    runs = [RUNNER.invoke(app, ["generate", str(STORIES), "Once upon a time", "--max-new-tokens", "12", "-q"]) for _ in range(2)]
    documents = [json.loads(r.stdout) for r in runs]
    assert all(r.exit_code == 0 for r in runs) and documents[0]["text"] == documents[1]["text"] and documents[0]["new_tokens"] > 0
    assert documents[0]["command"] == "generate" and documents[0]["method"] == "llm.int8" and documents[0]["sampling"] == "greedy"
    sampled = json.loads(RUNNER.invoke(app, ["generate", str(STORIES), "Once upon a time", "--temperature", "1.0", "--seed", "3", "-q"]).stdout)
    assert sampled["sampling"] == {"temperature": 1.0, "seed": 3}


@needs_stories
@needs_data
def test_lm_eval_command_runs_offline_on_cpu_with_an_llmint8_folder(tmp_path):
    quantize_checkpoint(str(STORIES), tmp_path / "int8", QuantizeOptions(calib_samples=0))
    result = llmint8("lm-eval", "--model", "hf", "--model_args", f"pretrained={tmp_path / 'int8'}", "--tasks", "piqa", "--limit", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "piqa_local" in result.stdout and "offline: piqa read local files" in result.stderr


@pytest.mark.parametrize(("block", "words"), [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False}, "already quantized (bitsandbytes 4-bit)"),
    ({"quant_method": "gptq", "bits": 4}, "already quantized (gptq)"),
])
def test_folders_quantized_otherwise_are_one_line_errors(tmp_path, block, words):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "quantization_config": block}))
    result = RUNNER.invoke(app, ["quantize", str(src), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        f"llmint8: error: {src}: {words}; llmint8 reads 16-bit models, llmint8 folders and bitsandbytes 8-bit folders"
    ]


@pytest.mark.skipif("kernels" not in importlib.metadata.packages_distributions(), reason="Hugging Face's kernels package is not installed")
def test_the_checkouts_kernels_folder_does_not_shadow_hugging_faces_kernels():
    """transformers (5.25 on) imports `kernels`; from the checkout's root our folder has that name."""
    probe = "import kernels, transformers.integrations.hub_kernels; print(kernels.__file__)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not Path(result.stdout.strip()).is_relative_to(ROOT / "kernels")
