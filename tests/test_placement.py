"""Models larger than one device (issue #46, part 1): accelerate's placement, checked on the CPU
with layers offloaded to the disk, which is what a model past RAM needs and what a GPU split does
in between (accelerate's hooks move each layer's weights to where it runs)."""

import json

import pytest
import torch
from typer.testing import CliRunner

import llmint8_cli
from conftest import DATA, STORIES, needs_data, needs_stories, save_tiny, tiny_model, tiny_tokenizer
from llmint8_cli.checkpoint.quantize import QuantizeOptions, quantize_checkpoint
from llmint8_cli.cli import app
from llmint8_cli.errors import InvalidArgumentError
from llmint8_cli.nn.linear import Int8Linear

RUNNER = CliRunner()
TEXT = ("Large language models keep a few hidden features far larger than the rest; LLM.int8() keeps them in 16-bit. " * 30).strip()
SPLIT = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.norm": "disk", "model.rotary_emb": "cpu", "lm_head": "cpu"}
TOO_SMALL = "cpu=40KiB"  # the tiny llama in fp32 holds about 120 KiB of weights


def run(*args, code: int = 0):
    result = RUNNER.invoke(app, [*map(str, args), "-q"])
    assert result.exit_code == code, result.stderr
    return json.loads(result.stdout) if code == 0 else result.stderr.strip().splitlines()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(a 16-bit source in fp16 with its tokenizer, its llm.int8 folder calibrated on the text, the text)."""
    root = tmp_path_factory.mktemp("placement")
    src = save_tiny(tiny_model("llama", outlier_scale=20.0).half(), root / "src")
    tiny_tokenizer().save_pretrained(src)
    text, calibration = root / "text.txt", root / "calibration.txt"
    text.write_text(TEXT)
    calibration.write_text(TEXT.upper())  # never the evaluated text
    quantize_checkpoint(str(src), root / "int8", QuantizeOptions(calib_samples=2, calib_seq_len=64, calib_dataset=str(calibration)))
    return src, root / "int8", text


def test_an_llmint8_folder_split_over_the_cpu_and_the_disk_gives_the_same_logits(folders, tmp_path):
    _, int8, _ = folders
    whole = llmint8_cli.load(int8, dtype=torch.float32)
    split = llmint8_cli.load(int8, dtype=torch.float32, device_map=SPLIT, offload_folder=tmp_path / "offload")
    down = split.model.layers[0].mlp.down_proj
    assert isinstance(down, Int8Linear) and down.weight.device.type == "meta"  # the int8 rows too (a buffer) stay on the disk until the layer runs
    ids = torch.tensor([[1, 40, 72, 69, 4, 85, 89, 73, 67, 75, 4, 90]])
    with torch.no_grad():
        assert torch.equal(split(ids).logits, whole(ids).logits)


@pytest.mark.parametrize("which", ["stored", "on the fly"])
def test_eval_ppl_placed_past_its_memory_gives_the_same_perplexity(folders, tmp_path, which):
    """--max-memory below the model's size: accelerate fills the CPU and offloads the rest to the
    disk; every figure equals the unplaced run's, and the JSON says where each module went. On the
    fly, each method is streamed through quantize into a temporary folder and loaded placed."""
    src, int8, text = folders
    model = int8 if which == "stored" else src
    common = [model, "--dataset", text, "--seq-len", 64, "--calib-samples", 2, "--calib-seq-len", 64, "--calib-dataset", text.with_name("calibration.txt")]
    if which == "stored":
        common = common[:5]
    else:
        common += ["--methods", "llm.int8,vectorwise"]
    alone = run("eval-ppl", *common)
    placed = run("eval-ppl", *common, "--device-map", "auto", "--max-memory", TOO_SMALL, "--offload-folder", tmp_path / "offload")
    assert alone["results"].keys() == placed["results"].keys() and len(alone["results"]) >= 2
    for name, row in alone["results"].items():
        assert placed["results"][name]["ppl"] == row["ppl"], name
        assert placed["results"][name]["calibration"] == row["calibration"], name
        assert "disk" in placed["results"][name]["placement"]["modules_per_device"], name
        assert "placement" not in row
    assert not (tmp_path / "offload").exists()  # the offloaded layers and the quantized copies are gone, and the folder the run made


def test_generate_and_outliers_placed(folders, tmp_path):
    src, int8, text = folders
    for model in (int8, src):
        alone = run("generate", model, "The quick", "--max-new-tokens", 6)
        placed = run("generate", model, "The quick", "--max-new-tokens", 6, "--device-map", json.dumps(SPLIT), "--offload-folder", tmp_path / "g")
        assert placed["text"] == alone["text"] and placed["placement"]["modules_per_device"]["disk"] == 2
    alone = run("outliers", src, "--dataset", text, "--samples", 2, "--seq-len", 64, "--threshold", 4)
    placed = run("outliers", src, "--dataset", text, "--samples", 2, "--seq-len", 64, "--threshold", 4,
                 "--device-map", "auto", "--max-memory", TOO_SMALL, "--offload-folder", tmp_path / "o")
    assert placed["features"] == alone["features"] and placed["features"]


@pytest.mark.parametrize("which", ["16-bit", "int8"])
def test_a_max_memory_too_small_is_one_line_before_any_weight_is_read(folders, tmp_path, which):
    """The weights are made unreadable garbage (the stored folder's manifest then fails too): the
    refusal still comes first, from the config and the headers alone."""
    import shutil

    src, int8, text = folders
    copy = shutil.copytree(src if which == "16-bit" else int8, tmp_path / "copy")
    shard = next(copy.glob("*.safetensors"))
    header = 8 + int.from_bytes(shard.read_bytes()[:8], "little")
    shard.write_bytes(shard.read_bytes()[:header] + b"\xff" * (shard.stat().st_size - header))
    calibration = ["--calib-samples", 0] if which == "16-bit" else []
    lines = run("eval-ppl", copy, "--dataset", text, "--seq-len", 64, *calibration, "--device-map", "auto", "--max-memory", TOO_SMALL, code=2)
    assert len(lines) == 1 and "does not fit in cpu=40.0 KiB" in lines[0] and "--offload-folder" in lines[0], lines


@pytest.mark.parametrize("args, message", [
    (["--max-memory", "cpu=1GiB"], "--max-memory places a model with --device-map"),
    (["--offload-folder", "x"], "--offload-folder places a model with --device-map"),
    (["--device-map", "everywhere"], "--device-map must be one of auto, balanced, balanced_low_0, sequential"),
    (["--device-map", "auto", "--max-memory", "cpu:1GiB"], "is not DEVICE=SIZE"),
    (["--device-map", "auto", "--max-memory", "cpu=lots"], "not a size: 'lots'"),
    (["--device-map", "auto", "--max-memory", "3=1GiB"], "GPU 3 asked for, but this machine has"),
    (["--device-map", '{"model.layers.0": "cpu"}'], "names no device for model.embed_tokens.weight"),
    (["--device-map", '{"": "tpu"}'], "unknown device 'tpu'"),
    (["--device-map", "auto", "--device", "cpu"], "--device puts the whole model on one device"),
])
def test_placement_options_that_cannot_work_are_one_line(folders, args, message):
    src, _, text = folders
    lines = run("eval-ppl", src, "--dataset", text, "--seq-len", 64, "--calib-samples", 0, *args, code=2)
    assert len(lines) == 1 and message in lines[0], lines


def test_the_python_api_takes_transformers_arguments(folders):
    _, int8, _ = folders
    with pytest.raises(InvalidArgumentError, match=r"does not fit in cpu=10.0 KiB: give more with max_memory=\{...\}, or offload_folder=DIR"):
        llmint8_cli.load(int8, device_map="sequential", max_memory={"cpu": "10KiB"})
    with pytest.raises(InvalidArgumentError, match="max_memory and offload_folder place a model with device_map"):
        llmint8_cli.load(int8, max_memory={"cpu": "1GiB"})  # was ignored without a word
    for device_map in ({"": "cpu"}, "cpu", "auto"):  # one device by name, as transformers takes it, or a strategy
        model = llmint8_cli.load(int8, device_map=device_map, max_memory={"cpu": "1GiB"})
        assert model.hf_device_map == {"": "cpu"}, device_map


@pytest.mark.slow  # 20-35 s: the default suite stays under 15 minutes; its eval-ppl twin runs there
@needs_stories
@needs_data
def test_eval_zeroshot_placed_gives_the_same_accuracies(tmp_path):
    args = ["eval-zeroshot", STORIES, "--tasks", "piqa", "--limit", 5, "--methods", "llm.int8", "--calib-samples", 0, "--data-dir", DATA]
    alone = run(*args)
    placed = run(*args, "--device-map", "auto", "--max-memory", "cpu=300KiB", "--offload-folder", tmp_path / "offload")
    for method, row in alone["tasks"]["piqa"].items():
        assert placed["tasks"]["piqa"][method]["acc"] == row["acc"], method
        assert "disk" in placed["placement"][method]["modules_per_device"], method


def test_the_offload_folder_is_left_as_it_was_found(folders, tmp_path):
    """accelerate wrote the baseline's offloaded layers into --offload-folder and left them there
    (338 MB for SmolLM2); now a run offloads into a folder of its own inside it, removed at the end."""
    src, int8, text = folders
    mine = tmp_path / "offload"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for model, calibration in ((int8, []), (src, ["--calib-samples", 0])):
        run("eval-ppl", model, "--dataset", text, "--seq-len", 64, *calibration, "--device-map", "auto", "--max-memory", TOO_SMALL, "--offload-folder", mine)
        assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_an_fp32_source_placed_gives_the_one_device_figures(tmp_path):
    """The streamed copy kept an fp32 source's unquantized tensors in fp16 (stories260K: 99.194 placed, 99.364 alone)."""
    src = save_tiny(tiny_model("llama", outlier_scale=20.0), tmp_path / "src")  # fp32
    tiny_tokenizer().save_pretrained(src)
    (tmp_path / "text.txt").write_text(TEXT)
    common = [src, "--dataset", tmp_path / "text.txt", "--seq-len", 64, "--calib-samples", 0, "--methods", "llm.int8,vectorwise"]
    alone = run("eval-ppl", *common)
    placed = run("eval-ppl", *common, "--device-map", "auto", "--max-memory", "cpu=60KiB", "--offload-folder", tmp_path / "offload")
    for name, row in alone["results"].items():
        assert placed["results"][name]["ppl"] == row["ppl"], name
    assert not placed["notes"]


@needs_stories
def test_a_gguf_source_placed_whole_on_the_disk_runs(tmp_path):
    """A GGUF file is expanded in RAM, then placed; a budget that sends every layer to the disk
    crashed with a FileNotFoundError for accelerate's index.json."""
    gguf = STORIES.parent / "stories260K.gguf"
    if not gguf.is_file():
        pytest.skip("needs ../shared/models/stories260K.gguf")
    (tmp_path / "text.txt").write_text("Once upon a time there was a little girl who liked to play in the park. " * 20)
    common = [gguf, "--dataset", tmp_path / "text.txt", "--seq-len", 64, "--methods", "fp16"]
    alone = run("eval-ppl", *common)
    placed = run("eval-ppl", *common, "--device-map", "auto", "--max-memory", "cpu=10KiB", "--offload-folder", tmp_path / "offload")
    assert placed["results"]["fp16"]["ppl"] == alone["results"]["fp16"]["ppl"]
    assert placed["results"]["fp16"]["placement"]["modules_per_device"] == {"disk": 1}
