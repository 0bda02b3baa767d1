"""The checkpoint format: quantize -> load round trips, bad inputs, atomic writes."""

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import SHARED, STORIES, needs_data, needs_stories, save_tiny, tiny_model
from llmint8_cli import Int8Linear, quantize_model
from llmint8_cli.checkpoint import writer
from llmint8_cli.checkpoint.load import load
from llmint8_cli.checkpoint.quantize import QuantizeOptions, quantize_checkpoint
from llmint8_cli.cli import app
from llmint8_cli.errors import CheckpointError

RUNNER = CliRunner()
NO_CALIB = QuantizeOptions(calib_samples=0)


def stored_outliers(model) -> dict:
    return {n: m.outlier_idx.long() for n, m in model.named_modules() if isinstance(m, Int8Linear)}


def assert_round_trip(src, out, dtype, vocab, options=NO_CALIB):
    """quantize -> load gives bit-for-bit the logits of the source loaded in that dtype and converted in memory."""
    from transformers import AutoModelForCausalLM

    summary = quantize_checkpoint(str(src), out, options)
    loaded = load(out)
    in_memory = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    reference = quantize_model(in_memory, options.method, options.threshold, outliers=stored_outliers(loaded))
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
    return summary, loaded


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "gemma3"])
@pytest.mark.parametrize("method", ["llm.int8", "llm.int8-zp", "absmax"])
def test_round_trip_is_bit_exact(tmp_path, arch, method):
    src = save_tiny(tiny_model(arch, outlier_scale=40.0).half(), tmp_path / "src")
    summary, loaded = assert_round_trip(src, tmp_path / "out", torch.float16, 128, QuantizeOptions(method=method, calib_samples=0))
    assert summary["method"] == method and summary["dtype"] == "float16"
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "llmint8" and config["format_version"] == 1 and config["method"] == method
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        name = config["quantized_modules"][0]
        assert f.get_tensor(f"{name}.weight").dtype == torch.int8
        assert f.get_tensor(f"{name}.weight_scale").dtype == torch.float32
        assert f.get_tensor(f"{name}.outlier_idx").dtype == torch.int32
        assert (f"{name}.weight_zero" in f.keys()) == method.endswith("-zp")
    assert loaded.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False).shape == (1, 7)


@needs_stories
@needs_data
def test_stories260k_round_trip_with_calibration(tmp_path):
    options = QuantizeOptions(calib_samples=4, calib_seq_len=128, calib_dataset="ptb")
    summary, loaded = assert_round_trip(STORIES, tmp_path / "out", torch.float16, 512, options)
    assert summary["calibration"]["samples"] == 4 and set(summary["outlier_columns"]) == set(stored_outliers(loaded))
    assert summary["outlier_columns_total"] == sum(int(v.numel()) for v in stored_outliers(loaded).values())


def test_sharded_output_index_and_manifest(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    out = tmp_path / "out"
    quantize_checkpoint(str(src), out, QuantizeOptions(calib_samples=0, max_shard_bytes=8000))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    manifest = json.loads((out / "llmint8_manifest.json").read_text())["files"]
    for name, entry in manifest.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]
    load(out)
    with (out / shards[0]).open("r+b") as handle:  # flip one byte: verification refuses the file
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="sha256"):
        load(out)
    load(out, verify_files=False)


def test_streaming_writer_matches_safetensors_reader(tmp_path):
    tensors = {"a": torch.randn(3, 5).half(), "b": torch.arange(7, dtype=torch.int32), "c": torch.randint(-127, 127, (4, 4), dtype=torch.int8), "d": torch.randn(2).bfloat16()}
    groups = [writer.Group([writer.Entry(k, v.dtype, tuple(v.shape))], lambda k=k, v=v: {k: v}) for k, v in tensors.items()]
    digest = writer.write_shard(tmp_path / "x.safetensors", writer.plan_shards(groups, 1 << 30)[0])
    assert digest == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        for key, value in tensors.items():
            assert torch.equal(f.get_tensor(key), value)


def test_size_ratio_for_linear_dominated_models(tmp_path):
    from transformers import LlamaConfig, AutoModelForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=512, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    src = save_tiny(AutoModelForCausalLM.from_config(config).half(), tmp_path / "src")
    summary = quantize_checkpoint(str(src), tmp_path / "out", NO_CALIB)
    assert summary["ratio_vs_fp16"] <= 0.51


def test_source_is_never_modified(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
    quantize_checkpoint(str(src), tmp_path / "out", NO_CALIB)
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}


def test_failure_mid_write_leaves_no_output(tmp_path, monkeypatch):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    out = tmp_path / "out"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("llmint8_cli.checkpoint.writer.write_shard", disk_full)
    with pytest.raises(CheckpointError, match="No space left"):
        quantize_checkpoint(str(src), out, NO_CALIB)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_existing_output_needs_force(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    out = tmp_path / "out"
    assert RUNNER.invoke(app, ["quantize", str(src), str(out), "--calib-samples", "0", "-q"]).exit_code == 0
    result = RUNNER.invoke(app, ["quantize", str(src), str(out), "--calib-samples", "0", "-q"])
    assert result.exit_code == 2 and "--force" in result.stderr
    result = RUNNER.invoke(app, ["quantize", str(src), str(out), "--calib-samples", "0", "-q", "--force"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["quantized_layers"] == 14


def test_killed_run_leaves_no_output(tmp_path):
    """kill -9 in the middle of writing: OUT never appears (only a hidden temporary folder)."""
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    out = tmp_path / "out"
    script = (
        "import os, signal, llmint8_cli.checkpoint.writer as w\n"
        "real = w.write_shard\n"
        "def die(path, shard, on_group=None):\n"
        "    path.write_bytes(b'partial')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "w.write_shard = die\n"
        "import llmint8_cli.checkpoint.quantize as q\n"
        f"q.quantize_checkpoint({str(src)!r}, {str(out)!r}, q.QuantizeOptions(calib_samples=0))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()


def write_bad_sources(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Each bad input the issue lists -> (CLI arguments, expected words in the error)."""
    good = save_tiny(tiny_model("llama"), tmp_path / "good")
    cases = {}
    cases["missing"] = ([str(tmp_path / "nope"), str(tmp_path / "o1")], "no such file")
    (tmp_path / "empty").mkdir()
    cases["empty"] = ([str(tmp_path / "empty"), str(tmp_path / "o2")], "empty")
    corrupt = save_tiny(tiny_model("llama"), tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    cases["corrupt"] = ([str(corrupt), str(tmp_path / "o3")], "corrupt or truncated")
    truncated = save_tiny(tiny_model("llama"), tmp_path / "truncated")
    raw = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    cases["truncated"] = ([str(truncated), str(tmp_path / "o4")], "corrupt or truncated")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((good / "config.json").read_text())

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, pickled / "pytorch_model.bin")
    cases["pickled-code"] = ([str(pickled), str(tmp_path / "o5")], "pickled")
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    cases["missing-config"] = ([str(no_config), str(tmp_path / "o6")], "config.json")
    unsupported = save_tiny(tiny_model("llama"), tmp_path / "unsupported")
    config = json.loads((unsupported / "config.json").read_text())
    config["model_type"] = "vit"
    (unsupported / "config.json").write_text(json.dumps(config))
    cases["unsupported-architecture"] = ([str(unsupported), str(tmp_path / "o7")], "unsupported")
    nan_model = tiny_model("llama")
    with torch.no_grad():
        nan_model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    nan_dir = save_tiny(nan_model, tmp_path / "nan")
    cases["nan-weights"] = ([str(nan_dir), str(tmp_path / "o8")], "NaN or Inf")
    cases["out-inside-src"] = ([str(good), str(good / "int8")], "inside the source")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cases["out-not-writable"] = ([str(good), str(locked / "sub" / "out")], "cannot write")
    cases["unknown-method"] = ([str(good), str(tmp_path / "o9"), "--method", "int4"], "unknown method")
    cases["offline-hub-id"] = (["facebook/opt-13b", str(tmp_path / "o10")], "run `hf download facebook/opt-13b --local-dir opt-13b` and pass that folder")
    cases["offline-short-name"] = (["opt-13b", str(tmp_path / "o10")], "cannot fetch 'facebook/opt-13b'")
    cases["unknown-model-name"] = (["opt-13B", str(tmp_path / "o10")], "not a known model name; did you mean opt-13b")
    listed = save_tiny(tiny_model("llama"), tmp_path / "header-list")
    rewrite_header(listed / "model.safetensors", lambda header: list(header))
    cases["header-a-json-list"] = ([str(listed), str(tmp_path / "o11")], "header is a JSON list")
    reshaped = save_tiny(tiny_model("llama"), tmp_path / "reshaped")

    def widen(header):
        header["model.norm.weight"]["shape"] = [64]
        return header

    rewrite_header(reshaped / "model.safetensors", widen)
    cases["shape-beyond-its-bytes"] = ([str(reshaped), str(tmp_path / "o12")], "model.norm.weight: shape [64] needs 256 bytes, its data range holds 128")
    big = tiny_model("llama")
    with torch.no_grad():
        big.model.norm.weight[0] = 1e6  # finite in fp32, inf in fp16
    big_dir = save_tiny(big, tmp_path / "big")
    cases["fp16-overflow"] = ([str(big_dir), str(tmp_path / "o13"), "--dtype", "fp16"], "model.norm.weight: finite values up to 1e+06 overflow float16")
    return cases


def rewrite_header(path: Path, edit) -> None:
    """A safetensors file with its JSON header replaced by edit(header), data untouched."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.dumps(edit(json.loads(raw[8 : 8 + length]))).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + length :])


def test_bad_inputs_give_one_line_errors(tmp_path):
    for name, (args, words) in write_bad_sources(tmp_path).items():
        if name == "out-not-writable" and os.geteuid() == 0:
            continue  # root writes anywhere; covered below with a file in the way
        result = RUNNER.invoke(app, ["quantize", *args, "--calib-samples", "0", "-q"])
        assert result.exit_code == 2, (name, result.stdout, result.stderr, result.exception)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("llmint8: error:"), (name, result.stderr)
        assert words.lower() in lines[0].lower(), (name, lines[0])
        assert "Traceback" not in result.stderr and "pwned" not in result.stdout


def test_clamp_overflow_clamps_with_a_warning(tmp_path):
    big = tiny_model("llama")
    with torch.no_grad():
        big.model.norm.weight[0] = -1e6
    src = save_tiny(big, tmp_path / "big")
    result = RUNNER.invoke(app, ["quantize", str(src), str(tmp_path / "out"), "--dtype", "fp16", "--clamp-overflow", "--calib-samples", "0", "-q"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip() == "llmint8: warning: clamped to the float16 range: model.norm.weight"
    assert json.loads(result.stdout)["clamped_tensors"] == ["model.norm.weight"]
    from safetensors.torch import load_file

    norm = load_file(tmp_path / "out" / "model.safetensors")["model.norm.weight"]
    assert norm[0].item() == -65504.0 and torch.equal(norm[1:], big.model.norm.weight[1:].half())


def test_output_under_a_file_is_refused(tmp_path):
    good = save_tiny(tiny_model("llama"), tmp_path / "good")
    (tmp_path / "afile").write_text("x")
    result = RUNNER.invoke(app, ["quantize", str(good), str(tmp_path / "afile" / "out"), "--calib-samples", "0", "-q"])
    assert result.exit_code == 2 and "cannot write" in result.stderr


@pytest.mark.skipif(not (SHARED / "models" / "stories260K.gguf").is_file(), reason="needs ../shared/models/stories260K.gguf")
def test_gguf_source(tmp_path):
    out = tmp_path / "out"
    summary = quantize_checkpoint(str(SHARED / "models" / "stories260K.gguf"), out, NO_CALIB)
    assert summary["quantized_layers"] == 35
    model = load(out)
    assert model.generate(torch.tensor([[1, 5]]), max_new_tokens=3, do_sample=False).shape == (1, 5)
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


@pytest.mark.skipif(not (SHARED / "models" / "stories260K.gguf").is_file(), reason="needs ../shared/models/stories260K.gguf")
def test_a_gguf_files_expansion_is_kept_and_loads_as_the_file_does(tmp_path, monkeypatch):
    """The first float32 load of a GGUF file keeps transformers' expansion in the cache; later loads
    (any dtype, the config, the tokenizer) read it and get what the file gives; a changed file is
    expanded again; an unwritable cache only costs the next expansion. The file is never touched."""
    from llmint8_cli import models

    gguf = tmp_path / "stories.gguf"
    gguf.write_bytes((SHARED / "models" / "stories260K.gguf").read_bytes())
    monkeypatch.setenv("LLMINT8_CACHE_DIR", str(tmp_path / "cache"))
    source = models.ModelSource("gguf", str(gguf))
    assert models.expanded_gguf(gguf) is None
    from_file = {dtype: models.load_model(source, dtype=dtype) for dtype in (torch.bfloat16, None)}  # bf16 first: only float32 is kept
    folder = models.expanded_gguf(gguf)
    assert folder is not None and source.from_pretrained_args() == (str(folder), {})
    for dtype, expected in from_file.items():
        kept = models.load_model(source, dtype=dtype)
        assert kept.dtype == expected.dtype and kept.state_dict().keys() == expected.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), expected.state_dict().values()))
        ids = torch.tensor([[1, 5, 9, 2]])
        with torch.no_grad():
            assert torch.equal(kept(ids).logits, expected(ids).logits)
    kept_config, file_config = models.load_config(source).to_dict(), from_file[None].config.to_dict()
    assert {k for k in kept_config.keys() | file_config.keys() if kept_config.get(k) != file_config.get(k)} <= {"_name_or_path", "quantization_config"}
    from transformers import AutoTokenizer

    text = "Once upon a time there was a little dog named Spot."
    assert models.load_tokenizer(source)(text).input_ids == AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=gguf.name)(text).input_ids
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))  # the file changed: its expansion is stale
    assert models.expanded_gguf(gguf) is None and source.from_pretrained_args()[1] == {"gguf_file": gguf.name}
    models.load_model(source)
    assert models.expanded_gguf(gguf) == folder and len(list(folder.parent.iterdir())) == 1  # replaced, nothing left beside it
    other = tmp_path / "other.gguf"  # a second file; the first one's removal orphans its expansion
    other.write_bytes(gguf.read_bytes())
    gguf.rename(tmp_path / "kept.gguf")
    models.load_model(models.ModelSource("gguf", str(other)))
    assert not folder.exists() and models.expanded_gguf(other) is not None
    monkeypatch.setenv("LLMINT8_CACHE_DIR", str(other))  # a file where the cache should be
    assert models.load_model(models.ModelSource("gguf", str(other))) is not None and models.expanded_gguf(other) is None
    assert (tmp_path / "kept.gguf").read_bytes() == other.read_bytes() == (SHARED / "models" / "stories260K.gguf").read_bytes()


@pytest.mark.skipif(not (SHARED / "models" / "stories260K.gguf").is_file(), reason="needs ../shared/models/stories260K.gguf")
@pytest.mark.parametrize("quiet", [False, True])
def test_keeping_a_gguf_expansion_is_one_line_on_stderr_and_none_under_quiet(tmp_path, monkeypatch, quiet):
    gguf = tmp_path / "stories.gguf"
    gguf.write_bytes((SHARED / "models" / "stories260K.gguf").read_bytes())
    (tmp_path / "text.txt").write_text("Once upon a time there was a little girl who liked to play in the park. " * 20)
    monkeypatch.setenv("LLMINT8_CACHE_DIR", str(tmp_path / "cache"))
    arguments = ["eval-ppl", str(gguf), "--dataset", str(tmp_path / "text.txt"), "--seq-len", "64", "--methods", "fp16"]
    first, second = (RUNNER.invoke(app, arguments + (["-q"] if quiet else [])) for _ in range(2))
    assert first.exit_code == second.exit_code == 0, first.stderr
    kept = [line for line in first.stderr.splitlines() if line.startswith("llmint8: kept stories.gguf expanded in ")]
    assert (not first.stderr if quiet else len(kept) == 1) and "expanded" not in second.stderr
    assert json.loads(first.stdout)["results"]["fp16"]["ppl"] == json.loads(second.stdout)["results"]["fp16"]["ppl"]


@pytest.mark.slow
def test_smollm2_round_trip_is_bit_exact(tmp_path):
    """quantize smollm2-135m (GGUF) -> load == the GGUF model loaded in fp16 and converted in memory."""
    from llmint8_cli import models

    try:
        source = models.resolve("smollm2-135m")
    except Exception as exc:
        pytest.skip(str(exc))
    out = tmp_path / "smol"
    quantize_checkpoint("smollm2-135m", out, QuantizeOptions(calib_samples=2, calib_seq_len=128, calib_dataset="c4"))
    loaded = load(out)
    reference = quantize_model(models.load_model(source, dtype=torch.float16), "llm.int8", 6.0, outliers=stored_outliers(loaded))
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


@needs_stories
@needs_data
def test_eval_refuses_a_modified_checkpoint_unless_no_verify(tmp_path):
    out = tmp_path / "int8"
    quantize_checkpoint(str(STORIES), out, NO_CALIB)
    with (out / "model.safetensors").open("r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    args = ["eval-ppl", str(out), "--dataset", "ptb", "--seq-len", "128", "--max-tokens", "512", "-q"]
    refused = RUNNER.invoke(app, args)
    assert refused.exit_code == 2 and "sha256" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert RUNNER.invoke(app, [*args, "--no-verify"]).exit_code == 0


@pytest.mark.parametrize(("field", "value", "words"), [("method", "int4", "unknown method 'int4'"), ("method", "fp16", "method 'fp16' is not one of the 8-bit methods"), ("threshold", -1, "threshold must be a positive"), ("quantized_modules", "all", "quantized_modules is not a list")])
def test_a_bad_quantization_config_names_its_config_json(tmp_path, field, value, words):
    out = tmp_path / "int8"
    quantize_checkpoint(str(save_tiny(tiny_model("llama"), tmp_path / "src")), out, NO_CALIB)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"][field] = value
    (out / "config.json").write_text(json.dumps(config))
    text = tmp_path / "text.txt"
    text.write_text("a few words of text " * 20)  # local data: the check must not depend on ../shared
    for args in (["eval-ppl", str(out), "--dataset", str(text), "--no-verify"], ["bench", str(out), "--no-verify"]):
        result = RUNNER.invoke(app, [*args, "-q"])
        assert result.exit_code == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"llmint8: error: {out / 'config.json'}: quantization_config: {words}"), result.stderr
    with pytest.raises(CheckpointError, match=f"config.json: quantization_config: {words}"):
        load(out, verify_files=False)


def test_load_with_an_accelerate_device_map(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    quantize_checkpoint(str(src), tmp_path / "out", NO_CALIB)
    half = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    a, b = load(tmp_path / "out", device_map=half), load(tmp_path / "out")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
