"""`llmint8 outliers` on planted outliers, and `llmint8 bench` end to end on small shapes."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import DATA, STORIES, needs_data, needs_stories, tiny_model
from llmint8_cli import activations
from llmint8_cli.cli import app
from llmint8_cli.nn.convert import as_linear, quantizable_layers

RUNNER = CliRunner()


def planted_model():
    """Tiny Llama whose norms blow up features 3 and 17 (x20) before every q/k/v and gate/up layer."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] = 20.0
            layer.post_attention_layernorm.weight[[3, 17]] = 20.0
    return model


def test_planted_features_are_found_and_systematic():
    model = planted_model()
    layers = dict(quantizable_layers(model))
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = activations.collect(model, ids.split(2), list(layers), 6.0)
    report = activations.analyze(stats, {n: tuple(as_linear(m).weight.shape) for n, m in layers.items()}, 16.0)
    assert report["systematic_features"] == report["systematic_by_ratio"] == [3, 17]
    hidden = [n for n in layers if not n.endswith(("o_proj", "down_proj"))]
    assert report["hidden_state_layers"] == len(hidden) == 10
    for name in hidden:
        assert report["layers"][name]["outlier_columns"] == 2, name
        assert stats.outlier_columns()[name].tolist() == [3, 17]
    assert report["features"][0]["layer_share"] == 1.0 and report["features"][0]["position_share"] > 0.5
    assert report["layers"]["model.layers.0.self_attn.q_proj"]["kind"] == "attention"
    assert report["layers"]["model.layers.0.mlp.up_proj"]["kind"] == "ffn"
    # 2 of 32 columns in the 10 hidden-state layers are kept in 16-bit, none elsewhere
    assert 0 < report["activation_share_16bit"] < 2 / 32


@needs_stories
@needs_data
def test_outliers_cli_writes_json_and_png(tmp_path):
    png = tmp_path / "outliers.png"
    result = RUNNER.invoke(app, ["outliers", str(STORIES), "--dataset", "ptb", "--samples", "2", "--seq-len", "64", "--plot", str(png), "-q"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["samples"] == 2 and len(report["layers"]) == 35
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = RUNNER.invoke(app, ["outliers", str(STORIES), "--plot", str(tmp_path / "x.jpg"), "-q"])
    assert bad.exit_code == 2 and ".png" in bad.stderr


def test_bench_layer_mode_reports_every_row():
    result = RUNNER.invoke(app, ["bench", "--shapes", "64x172", "--tokens", "1,3", "--outlier-cols", "0,6", "--repeat", "2", "-q"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    rows = document["rows"]
    names = {r["row"] for r in rows}
    assert {"fp32", "bfloat16", "float16", "int8 (vectorwise)", "llm.int8 (0 outliers)", "llm.int8 (6 outliers)"} <= names
    assert len({r["tokens"] for r in rows}) == 2
    for row in rows:
        assert row["median_ms"] > 0 and row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["rel_error_vs_fp32"] < 0.05, row
    int8 = next(r for r in rows if r["row"] == "int8 (vectorwise)")
    assert int8["weight_mib"] < next(r for r in rows if r["row"] == "bfloat16")["weight_mib"]
    assert document["machine"]["cpu"] and document["int8_gemm"]["plans"]
    assert any(r["row"].startswith("torchao") for r in rows) or any("torchao" in note for note in document["notes"])
    for args, words in ((["--shapes", "4096by4096"], "OUTxIN"), (["--shapes", "1000000x1000000"], "GiB"), (["--shapes", "64x32", "--outlier-cols", "100"], "exceeds"), (["--tokens", "0"], ">= 1"), (["--threshold", "20"], "model mode")):
        bad = RUNNER.invoke(app, ["bench", *args, "-q"])
        assert bad.exit_code == 2 and words in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, (args, bad.stderr)


@needs_stories
@needs_data
def test_bench_model_mode_decodes_a_batch():
    """A 16-bit model is calibrated as quantize calibrates it, so the speed is that of the folder a user gets."""
    calibration = ["--calib-samples", "2", "--calib-seq-len", "32", "--data-dir", str(DATA)]
    result = RUNNER.invoke(app, ["bench", str(STORIES), "--batch", "1,3", "--prompt-tokens", "16,32", "--new-tokens", "4", "--repeat", "1", *calibration, "-q"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["calibration"]["llm.int8"]["samples"] == 2 and document["threshold"] == 6.0
    baseline = {"bfloat16": "bf16", "float32": "fp32"}[document["dtype"]]  # --dtype auto: bf16 where the CPU has native bf16
    assert document["batches"] == [1, 3] and {baseline, "llm.int8"} <= set(document["results"])
    assert document["results"][baseline]["prefill"]["16"]["speedup"] == 1.0
    for name, row in document["results"].items():
        assert set(row["prefill"]) == {"16", "32"} and set(row["decode"]) == {"1", "3"}, name
        assert all(e["tokens_per_s"] > 0 and e["speedup"] > 0 for phase in ("prefill", "decode") for e in row[phase].values()), name
    assert document["results"]["llm.int8"]["weight_ratio"] < 1
    peer = document["results"].get("torchao W8A8")
    assert peer is not None or any("torchao" in note for note in document["notes"])
    assert_peer_rows(document, {"CTranslate2 int8", "CTranslate2 fp32"}, "ctranslate2", "CTranslate2")
    assert_peer_rows(document, {"llama.cpp Q8_0"}, "llama_cpp", "llama.cpp Q8_0")
    if "CTranslate2 int8" in document["results"]:  # its int8 model holds int8 weights
        assert document["results"]["CTranslate2 int8"]["weight_mib"] < document["results"]["CTranslate2 fp32"]["weight_mib"] / 3


@needs_stories
def test_bench_model_mode_takes_the_threshold_and_run_time_detection():
    args = ["bench", str(STORIES), "--method", "llm.int8-rotate", "--batch", "1", "--prompt-tokens", "16", "--new-tokens", "2", "--repeat", "1", "--calib-samples", "0",
            "--no-peers", "-q"]
    document = json.loads(RUNNER.invoke(app, [*args, "--threshold", "20"]).stdout)
    assert document["threshold"] == 20.0 and document["calibration"] == {"llm.int8-rotate": None}
    bad = RUNNER.invoke(app, [*args, "--threshold", "-1"])
    assert bad.exit_code == 2 and "threshold must be a positive finite number" in bad.stderr


def test_bench_times_a_shape_alone_with_random_weights(tmp_path):
    """A config.json is a shape: both models built from it with random weights, said in the JSON."""
    from conftest import tiny_config

    config = tmp_path / "config.json"
    config.write_text(tiny_config("llama").to_json_string())
    args = ["bench", str(config), "--batch", "1", "--prompt-tokens", "16", "--new-tokens", "2", "--repeat", "1", "-q"]
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    baseline = {"bfloat16": "bf16", "float32": "fp32"}[document["dtype"]]
    assert document["weights"] == "random" and document["shape"] == str(config) and document["model"] == str(config)
    assert {baseline, "llm.int8"} <= set(document["results"]) and document["calibration"] == {"llm.int8": None}
    assert document["results"]["llm.int8"]["weight_ratio"] < 1 and document["results"]["llm.int8"]["decode"]["1"]["tokens_per_s"] > 0
    assert any("random weights" in note for note in document["notes"])
    assert_peer_rows(document, {"CTranslate2 int8", "CTranslate2 fp32"}, "ctranslate2", "CTranslate2")
    assert_peer_rows(document, {"llama.cpp Q8_0"}, "llama_cpp", "llama.cpp Q8_0")
    alone = json.loads(RUNNER.invoke(app, [*args, "--no-peers"]).stdout)
    assert set(alone["results"]) == {baseline, "llm.int8"}


def assert_peer_rows(document: dict, rows: set[str], module: str, engine: str) -> None:
    """A peer engine's rows were timed like ours (tokens/s, a speedup against the 16-bit row), or a note says why not."""
    timed = rows & set(document["results"])
    if importlib.util.find_spec(module) is None:
        assert not timed and any(note.startswith(f"{engine}: not installed") for note in document["notes"])
        return
    assert timed == rows, document["notes"]
    for row in rows:
        entry = document["results"][row]
        assert entry["weight_mib"] >= 0 and all(e["tokens_per_s"] > 0 and e["speedup"] > 0 for phase in ("prefill", "decode") for e in entry[phase].values())


def test_bench_random_weights_refuses_what_does_not_fit_or_is_no_config(tmp_path, monkeypatch):
    import psutil
    from types import SimpleNamespace

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=1 << 30))
    big = RUNNER.invoke(app, ["bench", "Llama-3.2-1B", "--random-weights", "-q"])  # a shipped shape: 1.2 B parameters
    assert big.exit_code == 2 and big.stderr.count("\n") == 1 and "llama-3.2-1b: 2.3 GiB of" in big.stderr and "1.0 GiB free" in big.stderr, big.stderr
    (tmp_path / "list.json").write_text("[1, 2]")
    bad = RUNNER.invoke(app, ["bench", str(tmp_path / "list.json"), "-q"])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "not a transformers config.json" in bad.stderr
    placed = RUNNER.invoke(app, ["bench", "opt-1.3b", "--random-weights", "--device-map", "auto", "-q"])
    assert placed.exit_code == 2 and "--random-weights builds the model on --device" in placed.stderr
    layers = RUNNER.invoke(app, ["bench", "--random-weights", "-q"])
    assert layers.exit_code == 2 and "--random-weights is for model mode" in layers.stderr


def test_bench_layer_mode_without_peers_times_our_rows_only():
    result = RUNNER.invoke(app, ["bench", "--shapes", "64x128", "--tokens", "2", "--outlier-cols", "0", "--repeat", "1", "--no-peers", "-q"])
    assert result.exit_code == 0, result.stderr
    rows = {row["row"] for row in json.loads(result.stdout)["rows"]}
    assert "llm.int8 (0 outliers)" in rows and not any(row.startswith(("bitsandbytes", "torchao")) for row in rows)


def test_the_llama_cpp_gguf_computes_what_the_model_computes(tmp_path, monkeypatch):
    """The GGUF bench writes for llama.cpp holds the same weights (q/k rows permuted as llama.cpp's
    converter does): its logits are the model's up to Q8_0 rounding, far from a GGUF left unpermuted."""
    from llmint8_cli.evaluation import peers

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (make peers)")
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(8)  # attention that depends on the rotary layout
        model.model.layers[0].self_attn.k_proj.weight.mul_(8)
    ids = torch.tensor([[1, 40, 72, 69, 4, 85, 89, 73, 67, 75, 3, 99, 12, 7, 64, 31]])
    with torch.no_grad():
        expected = model(ids).logits[0].numpy()

    def error(folder) -> float:
        notes = []
        engine = peers.llama_cpp_engines(peers.save_16bit(model, folder), [16], [2], 4, notes)[peers.LLAMA_CPP]
        assert any("written with the gguf package" in note for note in notes)
        engine.prefill(ids)
        logits = np.stack([np.ctypeslib.as_array(engine.api.llama_get_logits_ith(engine.context, i), shape=(128,)).copy() for i in range(16)])
        engine.decode(ids[:, :8].repeat(2, 1), 4)  # two sequences decoded together
        return float(np.linalg.norm(logits - expected) / np.linalg.norm(expected))

    permuted = error(tmp_path / "permuted")
    monkeypatch.setattr(peers, "permuted_for_rope", lambda weight, heads: weight)
    assert permuted < 0.05 and error(tmp_path / "as-stored") > 2 * permuted
