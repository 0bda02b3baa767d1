"""Hostile and careless input, one class of bug per test: data loss under --force, code from a
cache, tampered folders, impossible values read back, exit 2 (never a traceback), resources."""

import json
import os
import pickle
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import DATA, ROOT, STORIES, needs_data, needs_stories, save_tiny, tiny_model, tiny_tokenizer
import llmint8_cli
from llmint8_cli.checkpoint.manifest import MANIFEST, write_manifest
from llmint8_cli.cli import app
from llmint8_cli.errors import CheckpointError, DataError

RUNNER = CliRunner()


def run(*args: str):
    return RUNNER.invoke(app, [*map(str, args)])


def assert_one_line_error(result, words: str, code: int = 2) -> None:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmint8: error:") and words in lines[0], result.stderr


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory):
    """A tiny Llama with planted outlier features, quantized (calibration off: no tokenizer needed)."""
    base = tmp_path_factory.mktemp("hostile")
    src = save_tiny(tiny_model("llama", outlier_scale=40.0), base / "src")
    assert run("quantize", src, base / "int8", "--calib-samples", "0", "-q").exit_code == 0
    return base / "int8"


@pytest.fixture
def copy_of(int8_folder, tmp_path):
    def make(name: str = "copy") -> Path:
        return Path(shutil.copytree(int8_folder, tmp_path / name))

    return make


# -- data loss -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["quantize", "export"])
def test_force_never_deletes_a_folder_that_only_claims_to_be_ours(tmp_path, int8_folder, command):
    """The issue's case: a project with an empty `{}` manifest dropped in; --force must not touch it."""
    project = tmp_path / "proj"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("code")
    (project / MANIFEST).write_text("{}")
    before = tree(project)
    source = int8_folder.parent / "src" if command == "quantize" else int8_folder
    extra = ["--calib-samples", "0"] if command == "quantize" else []
    assert_one_line_error(run(command, source, project, "--force", *extra, "-q"), "not an llmint8 output that --force may replace")
    assert tree(project) == before


@pytest.mark.parametrize("added", ["NOTES.md", "results/run.json"])
def test_force_keeps_files_a_user_added_to_an_earlier_output(tmp_path, int8_folder, added):
    out = Path(shutil.copytree(int8_folder, tmp_path / "out"))
    (out / added).parent.mkdir(exist_ok=True)
    (out / added).write_text("mine")
    before = tree(out)
    result = run("quantize", int8_folder.parent / "src", out, "--force", "--calib-samples", "0", "-q")
    assert_one_line_error(result, f"{out / added.split('/')[0]}")
    assert tree(out) == before


def test_force_keeps_an_output_whose_files_were_edited_and_replaces_an_untouched_one(tmp_path, int8_folder):
    out = Path(shutil.copytree(int8_folder, tmp_path / "out"))
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "my_note": "tuned"}))
    before = tree(out)
    assert_one_line_error(run("quantize", int8_folder.parent / "src", out, "--force", "--calib-samples", "0", "-q"), "changed since it was written")
    assert tree(out) == before
    shutil.rmtree(out)
    shutil.copytree(int8_folder, out)
    result = run("quantize", int8_folder.parent / "src", out, "--force", "--method", "absmax", "--calib-samples", "0", "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method"] == "absmax"


def test_an_old_output_set_aside_by_a_writer_that_died_is_put_back(tmp_path, int8_folder):
    from llmint8_cli.checkpoint import output

    out = tmp_path / "out"
    set_aside = tmp_path / f".out.old-999999999-1-{'ab' * 4}"  # a pid beyond pid_max: its writer is gone
    shutil.copytree(int8_folder, set_aside)
    (set_aside / ".llmint8-set-aside").write_text(output.marker_text("old", set_aside.name))  # as install() marks it
    assert output.remove_stale(out) == [] and tree(out) == tree(int8_folder) and not set_aside.exists()


@pytest.mark.parametrize("marker", [None, "another folder's", "a partial one"])
def test_a_users_folder_named_like_our_working_folders_is_left_alone(tmp_path, int8_folder, marker):
    """Named `.OUT.old-<pid>-<start>-<hex>` (or `.tmp-`) by a user, it was renamed onto OUT or removed."""
    from llmint8_cli.checkpoint import output

    out = tmp_path / "out"
    for kind in ("old", "tmp"):
        mine = tmp_path / f".out.{kind}-999999999-1-{'cd' * 4}"
        shutil.copytree(int8_folder, mine)
        name = {"old": ".llmint8-set-aside", "tmp": ".llmint8-partial"}[kind]
        if marker == "another folder's":
            (mine / name).write_text(output.marker_text(kind, f".out.{kind}-1-1-{'ef' * 4}"))
        elif marker == "a partial one":
            (mine / name).write_text("llmint8")
    before = tree(tmp_path)
    assert output.remove_stale(out) == [] and not out.exists() and tree(tmp_path) == before


def test_force_never_replaces_a_folder_whose_forged_manifest_lists_a_users_files(tmp_path, int8_folder):
    """Every file listed with its true hash, but no llmint8 output: no config with our block, no weights."""
    project = tmp_path / "proj"
    project.mkdir()
    (project / "main.py").write_text("code")
    (project / "config.json").write_text('{"name": "my project"}')
    write_manifest(project)
    before = tree(project)
    result = run("quantize", int8_folder.parent / "src", project, "--force", "--calib-samples", "0", "-q")
    assert_one_line_error(result, "not an llmint8 output that --force may replace")
    assert "no quantization_config of an llmint8 output" in result.stderr and tree(project) == before


def test_a_legal_240_character_output_name_is_written(tmp_path, int8_folder):
    out = tmp_path / ("o" * 240)
    result = run("quantize", int8_folder.parent / "src", out, "--calib-samples", "0", "-q")
    assert result.exit_code == 0, result.stderr
    assert (out / MANIFEST).is_file() and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


# -- code execution ------------------------------------------------------------------------------


class RunsCode:
    """A pickle that creates a file when unpickled (what a crafted cache would carry)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_sqlite_cache(path: Path, marker: Path) -> None:
    """A SqliteDict file as lm-eval writes it (table `unnamed`, pickled values) holding RunsCode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE unnamed (key TEXT PRIMARY KEY, value BLOB)")
        db.execute("INSERT INTO unnamed VALUES (?, ?)", ("0" * 64, sqlite3.Binary(pickle.dumps(RunsCode(marker)))))


@needs_stories
@needs_data
def test_a_crafted_pickle_in_the_cache_folder_never_runs(tmp_path):
    args = ["eval-zeroshot", STORIES, "--tasks", "piqa", "--limit", "2", "--methods", "fp16", "--data-dir", DATA, "--cache-dir", tmp_path / "cache", "-q"]
    first = run(*args)
    assert first.exit_code == 0, first.stderr
    cache = Path(json.loads(first.stdout)["caches"]["fp16"])
    assert cache.suffix == ".jsonl" and all(json.loads(line)["kind"] == "loglikelihood" for line in cache.read_text().splitlines())
    marker = tmp_path / "pwned"
    crafted_sqlite_cache(cache.with_name("lm-eval_rank0.db"), marker)
    second = run(*args)
    assert second.exit_code == 0, second.stderr
    assert not marker.exists()
    assert json.loads(second.stdout)["tasks"] == json.loads(first.stdout)["tasks"]
    assert any("not read (a pickle can run code)" in note for note in json.loads(second.stdout)["notes"])


def test_the_cache_converter_refuses_a_crafted_pickle_without_running_it(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import convert_request_caches
    finally:
        sys.path.remove(str(ROOT / "bench"))
    marker = tmp_path / "pwned"
    db = tmp_path / "lm-eval_rank0.db"
    crafted_sqlite_cache(db, marker)
    with pytest.raises(DataError, match="refusing global"):
        convert_request_caches.convert(db)
    assert not marker.exists() and not (tmp_path / "lm-eval.jsonl").exists()
    good = tmp_path / "ok" / "lm-eval_rank0.db"
    good.parent.mkdir()
    with sqlite3.connect(good) as db:
        db.execute("CREATE TABLE unnamed (key TEXT PRIMARY KEY, value BLOB)")
        db.execute("INSERT INTO unnamed VALUES (?, ?)", ("a" * 64, sqlite3.Binary(pickle.dumps((-1.5, True)))))
    line = json.loads(convert_request_caches.convert(good).read_text())
    assert line == {"kind": "loglikelihood", "key": "a" * 64, "answer": [-1.5, True]}


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ({"kind": "loglikelihood", "key": "a" * 64, "answer": [0.5, True]}, "must be [log-probability <= 0"),
        ({"kind": "loglikelihood", "key": "a" * 64, "answer": {"__reduce__": 1}}, "must be [log-probability <= 0"),
        ({"kind": "loglikelihood_rolling", "key": "a" * 64, "answer": float("nan")}, "a finite log-probability"),
        ({"kind": "exec", "key": "a" * 64, "answer": "x"}, "not a request-cache line"),
        ({"kind": "generate_until", "key": "../../x", "answer": "x"}, "not a request-cache line"),
    ],
)
def test_a_request_cache_line_outside_its_domain_is_refused_naming_it(tmp_path, line, words):
    from llmint8_cli.evaluation.request_cache import RequestCache

    path = tmp_path / "lm-eval.jsonl"
    good = {"kind": "generate_until", "key": "b" * 64, "answer": "fine"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError) as raised:
        RequestCache(path)
    assert "lm-eval.jsonl:2: " in str(raised.value) and words in str(raised.value)


@pytest.mark.parametrize("spelling", ["--use_cache", "-c", "--use_ca", "--cache_requests", "--cache_requests=true", "--cache_requests=refresh",
                                      "use_cache: in --config", "cache_requests: in --config"])
def test_every_spelling_of_lm_evals_pickled_caches_is_refused_before_a_planted_pickle_runs(tmp_path, spelling):
    """lm-eval's own parser takes short flags, abbreviations, a bare flag and a YAML --config:
    all of them are refused, and a pickle planted where the cache would be is never read."""
    marker = tmp_path / "pwned"
    cache = tmp_path / "cache"
    crafted_sqlite_cache(Path(f"{cache}_rank0.db"), marker)
    (tmp_path / "requests.pickle").write_bytes(pickle.dumps(RunsCode(marker)))
    if spelling.endswith("in --config"):
        key = spelling.split(":")[0]
        (tmp_path / "config.yaml").write_text(f"{key}: {cache if key == 'use_cache' else 'true'}\n")
        option = ["--config", tmp_path / "config.yaml"]
    else:
        option = [spelling] if "=" in spelling or spelling == "--cache_requests" else [spelling, cache]
    result = run("lm-eval", "--model", "hf", "--model_args", f"pretrained={tmp_path / 'nowhere'}", "--tasks", "piqa", "--limit", "1", *option)
    assert result.exit_code == 2, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("llmint8: error:")] == [next(
        line for line in result.stderr.splitlines() if "pickles, which can run code" in line)]
    assert not marker.exists()


def tiny_task_model(folder: Path) -> Path:
    save_tiny(tiny_model("llama"), folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


PIQA_ROWS = [{"goal": f"How do I open jar {i}?", "sol1": "Twist the lid.", "sol2": "Paint the lid.", "label": i % 2} for i in range(4)]


WEIRD_FOLDER_NAMES = ("a space #and hash", "x\ndoc_to_text: !function llmint8_planted_probe.run\n#", "brackets[1]*?")


def test_a_data_folder_name_is_never_read_as_yaml_or_a_pattern(tmp_path, monkeypatch):
    """The task YAML is written by a dumper and `datasets` reads a copy under a name we chose: a
    newline and `!function` in the folder name import nothing, a space, `#` or glob characters
    change nothing (the same answers as under a plain name)."""
    marker = tmp_path / "pwned"
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "llmint8_planted_probe.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\ndef run(doc):\n    return ''\n")
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    model = tiny_task_model(tmp_path / "model")
    tasks = {}
    for name in ("plain", *WEIRD_FOLDER_NAMES):
        data = tmp_path / "data" / name
        (data / "piqa").mkdir(parents=True)
        (data / "piqa" / "validation.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PIQA_ROWS))
        result = run("eval-zeroshot", model, "--tasks", "piqa", "--methods", "fp16", "--data-dir", data, "-q")
        assert result.exit_code == 0, result.stderr
        tasks[name] = json.loads(result.stdout)["tasks"]
    assert not marker.exists()
    assert tasks["plain"]["piqa"]["fp16"]["acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # four real answers scored
    assert all(answers == tasks["plain"] for answers in tasks.values())


def with_own_code(folder: Path, marker: Path, in_file: str = "config.json", model_type: str | None = "llmint8probe") -> Path:
    """A model folder that names its own Python code (auto_map) in config.json or
    tokenizer_config.json; importing that code creates `marker`."""
    document = json.loads((folder / in_file).read_text())
    if in_file == "config.json":
        document["auto_map"] = {"AutoConfig": "probe.ProbeConfig", "AutoModelForCausalLM": "probe.ProbeModel"}
        document["model_type"] = model_type or document["model_type"]
    else:
        document.update(auto_map={"AutoTokenizer": ["probe.ProbeTokenizer", None]}, tokenizer_class="ProbeTokenizer")
    (folder / in_file).write_text(json.dumps(document))
    (folder / "probe.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class ProbeConfig(LlamaConfig):\n    model_type = 'llmint8probe'\n"
        "class ProbeModel(LlamaForCausalLM):\n    config_class = ProbeConfig\n"
        "class ProbeTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    return folder


CALIBRATED = ["--calib-samples", "1", "--calib-seq-len", "16", "--calib-dataset"]


@pytest.mark.parametrize("in_file", ["config.json", "tokenizer_config.json"])
def test_a_folders_own_code_runs_only_with_trust_remote_code(tmp_path, in_file):
    """`yes | llmint8 quantize` once ran the folder's Python after a prompt on stdout: now no
    prompt, no code, one line naming the file; --trust-remote-code runs it."""
    marker = tmp_path / "pwned"
    (tmp_path / "calib.txt").write_text("Once upon a time there was a cat. " * 20)
    src = with_own_code(tiny_task_model(tmp_path / "src"), marker, in_file)
    args = ["quantize", src, tmp_path / "out", *CALIBRATED, tmp_path / "calib.txt", "-q"]
    result = RUNNER.invoke(app, list(map(str, args)), input="y\n" * 100)
    assert_one_line_error(result, f"{src / in_file}: the model needs its own Python code (auto_map)")
    assert "--trust-remote-code" in result.stderr and result.stdout == "" and not marker.exists() and not (tmp_path / "out").exists()
    trusted = run(*args, "--trust-remote-code")
    assert trusted.exit_code == 0, trusted.stderr
    assert marker.exists()


def test_a_known_architecture_naming_its_own_code_loads_with_transformers_classes(tmp_path):
    """transformers' default, ours too: where transformers has the class, the folder's code is not run."""
    marker = tmp_path / "pwned"
    src = with_own_code(tiny_task_model(tmp_path / "src"), marker, model_type=None)
    result = RUNNER.invoke(app, ["quantize", str(src), str(tmp_path / "out"), "--calib-samples", "0", "-q"], input="y\n" * 100)
    assert result.exit_code == 0, result.stderr
    assert not marker.exists() and json.loads(result.stdout)["command"] == "quantize"


@pytest.mark.parametrize("command", ["eval-ppl", "eval-zeroshot", "generate"])
def test_a_quantized_folder_is_verified_before_its_tokenizer_is_read(tmp_path, command):
    marker = tmp_path / "pwned"
    src = tiny_task_model(tmp_path / "src")
    assert run("quantize", src, tmp_path / "int8", "--calib-samples", "0", "-q").exit_code == 0
    with_own_code(tmp_path / "int8", marker, "tokenizer_config.json")
    (tmp_path / "text.txt").write_text("Once upon a time there was a cat. " * 20)
    extra = {"eval-ppl": ["--dataset", tmp_path / "text.txt", "--seq-len", "16"], "eval-zeroshot": ["--tasks", "piqa"], "generate": ["Once"]}[command]
    result = RUNNER.invoke(app, list(map(str, [command, tmp_path / "int8", *extra, "-q"])), input="y\n" * 100)
    assert result.exit_code == 2 and not marker.exists(), result.stderr
    assert "not listed in llmint8_manifest.json" in result.stderr or "does not match the manifest" in result.stderr


# -- tampering -----------------------------------------------------------------------------------


def first_layer(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["quantization_config"]["quantized_modules"][0]


def rewrite_tensors(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors, first_layer(folder))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def flip_int8_byte(folder):
    rewrite_tensors(folder, lambda t, layer: t[f"{layer}.weight"].view(-1)[0].add_(1))


def change_scale(folder):
    rewrite_tensors(folder, lambda t, layer: t[f"{layer}.weight_scale"].mul_(1.01))


def drop_weight_scale(folder):
    rewrite_tensors(folder, lambda t, layer: t.pop(f"{layer}.weight_scale"))


def edit_block(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"].update(changes)
        (folder / "config.json").write_text(json.dumps(config))

    return edit


TAMPERING = {
    "one int8 byte flipped": (flip_int8_byte, "does not match the manifest"),
    "a scale changed": (change_scale, "does not match the manifest"),
    "no manifest": (lambda folder: (folder / MANIFEST).unlink(), "no llmint8_manifest.json"),
    "an unknown format version": (edit_block(format_version=99), "format version 99 is not supported"),
    "the method edited": (edit_block(method="vectorwise"), "does not match the manifest"),
    "weight_scale missing": (drop_weight_scale, "does not match the manifest"),
    "a file added": (lambda folder: (folder / "tokenizer.json").write_text("{}"), "not listed in llmint8_manifest.json"),
    "a manifest that lists nothing": (lambda folder: (folder / MANIFEST).write_text('{"format_version": 1, "files": {}}'), "lists no config.json"),
    "a manifest entry of the wrong type": (lambda folder: (folder / MANIFEST).write_text(
        (folder / MANIFEST).read_text().replace('"size": ', '"size": "', 1).replace(',\n   "sha256"', '",\n   "sha256"', 1)), "needs a non-negative integer size"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_every_loader_refuses_a_tampered_folder(copy_of, case):
    from transformers import AutoModelForCausalLM

    tamper, words = TAMPERING[case]
    folder = copy_of()
    tamper(folder)
    with pytest.raises(CheckpointError, match=words):
        llmint8_cli.load(folder)
    with pytest.raises(CheckpointError, match=words):
        AutoModelForCausalLM.from_pretrained(folder)


def test_manifest_names_outside_the_folder_are_refused_before_anything_is_hashed(copy_of, monkeypatch):
    folder = copy_of()
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["../../etc/passwd"] = {"size": 1, "sha256": "0" * 64}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setattr("llmint8_cli.checkpoint.manifest.sha256_file", lambda path: pytest.fail(f"hashed {path}"))
    with pytest.raises(CheckpointError, match="is not a file name inside the folder"):
        llmint8_cli.load(folder)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda t, layer: t.update({f"{layer}.outlier_idx": torch.tensor([10_000], dtype=torch.int32),
                                    f"{layer}.outlier_weight": torch.zeros(len(t[f"{layer}.weight"]), 1, dtype=torch.float16)}), "outside the"),
        (lambda t, layer: t[f"{layer}.weight_scale"].fill_(float("nan")), "weight_scale: holds NaN"),
        (lambda t, layer: t.pop(f"{layer}.weight_scale"), "weight_scale missing"),
        (lambda t, layer: t.update({f"{layer}.weight": t[f"{layer}.weight"][:, :3].contiguous()}), "has shape"),
        (lambda t, layer: t.update({f"{layer}.weight_scale": t[f"{layer}.weight_scale"].to(torch.int32)}), "weight_scale is torch.int32, the format stores torch.float32"),
        (lambda t, layer: t.update({f"{layer}.outlier_weight": t[f"{layer}.outlier_weight"].to(torch.bfloat16)}),
         "outlier_weight is torch.bfloat16, the format stores torch.float16 (the dtype quantization_config records)"),
        ("dropped from the list", "belongs to a quantized layer that quantization_config does not list"),
    ],
)
def test_without_verification_impossible_values_are_still_refused(copy_of, monkeypatch, change, words):
    """verify=False (LLMINT8_NO_VERIFY=1 for transformers) skips the hashes, never the checks of what is read."""
    from transformers import AutoModelForCausalLM

    folder = copy_of()
    if change == "dropped from the list":
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"]["quantized_modules"].pop(0)
        (folder / "config.json").write_text(json.dumps(config))
    else:
        rewrite_tensors(folder, change)
    with pytest.raises(CheckpointError, match=re.escape(words)):
        llmint8_cli.load(folder, verify_files=False)
    monkeypatch.setenv("LLMINT8_NO_VERIFY", "1")
    with pytest.raises(CheckpointError, match=re.escape(words)):
        AutoModelForCausalLM.from_pretrained(folder)


def test_the_verify_escape_loads_a_folder_the_user_changed_on_purpose(copy_of, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder = copy_of()
    change_scale(folder)
    assert llmint8_cli.load(folder, verify_files=False) is not None
    monkeypatch.setenv("LLMINT8_NO_VERIFY", "1")
    assert AutoModelForCausalLM.from_pretrained(folder) is not None


def test_save_pretrained_lists_only_what_it_wrote_and_write_manifest_relists(tmp_path, int8_folder):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "NOTES.md").write_text("mine")
    llmint8_cli.load(int8_folder).save_pretrained(folder)
    assert "NOTES.md" not in json.loads((folder / MANIFEST).read_text())["files"]
    with pytest.raises(CheckpointError, match="NOTES.md: not listed"):
        llmint8_cli.load(folder)
    (folder / "NOTES.md").unlink()
    assert llmint8_cli.load(folder) is not None
    shutil.copy(int8_folder / "config.json", tmp_path / "x.json")
    (folder / "tokenizer_config.json").write_text("{}")  # a tokenizer saved beside it afterwards
    write_manifest(folder)
    assert llmint8_cli.load(folder) is not None


# -- silently wrong results ----------------------------------------------------------------------


@needs_stories
@needs_data
@pytest.mark.parametrize(("nll", "code", "words"), [(-5.0, 2, "'nll' must be a number from 0"), (1e300, 2, "'nll' must be a number from 0"), ("800/token", 3, "not finite")])
def test_impossible_or_overflowing_cached_nlls(tmp_path, nll, code, words):
    args = ["eval-ppl", STORIES, "--dataset", "ptb", "--seq-len", "64", "--max-tokens", "640", "--methods", "fp16", "--data-dir", DATA, "--cache-dir", tmp_path, "-q"]
    first = run(*args)
    assert first.exit_code == 0, first.stderr
    cache = next(tmp_path.rglob("ppl-*.jsonl"))
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    for entry in lines:
        entry["nll"] = 800.0 * 62 if nll == "800/token" else entry["nll"]
    lines[1]["nll"] = lines[1]["nll"] if nll == "800/token" else nll
    cache.write_text("".join(json.dumps(entry) + "\n" for entry in lines))
    result = run(*args)
    assert_one_line_error(result, words, code)
    if code == 3:
        assert json.loads(result.stdout)["results"]["fp16"]["ppl"] is None
    else:
        assert f"{cache.name}:2:" in result.stderr


def test_a_nan_or_misshapen_scb_in_a_bitsandbytes_source_is_refused(tmp_path, int8_folder):
    assert run("export", int8_folder, tmp_path / "bnb", "-q").exit_code == 0
    layer = first_layer(int8_folder)
    for name, change, words in [
        ("nan", lambda t: t[f"{layer}.SCB"].fill_(float("nan")), f"{layer}.SCB holds NaN"),
        ("shape", lambda t: t.update({f"{layer}.SCB": t[f"{layer}.SCB"][:3].contiguous()}), f"{layer}.SCB is float32 [3]"),
        ("dtype", lambda t: t.update({f"{layer}.SCB": t[f"{layer}.SCB"].to(torch.int32)}), "bitsandbytes stores a float vector"),
    ]:
        bad = Path(shutil.copytree(tmp_path / "bnb", tmp_path / f"bnb-{name}"))
        tensors = load_file(bad / "model.safetensors")
        change(tensors)
        save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
        assert_one_line_error(run("quantize", bad, tmp_path / f"back-{name}", "-q"), words)
        assert not (tmp_path / f"back-{name}").exists()


# -- exit 2, one line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"vocab_size": 10**12}, "transformers cannot build the model it describes"),
        ({"head_dim": 64}, "has shape"),
    ],
)
def test_a_config_that_contradicts_its_weights_is_one_line(tmp_path, change, words):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **change}))
    assert_one_line_error(run("quantize", src, tmp_path / "out", "--calib-samples", "0", "-q"), words)


@needs_stories
def test_a_source_without_a_tokenizer_says_so_whole(tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(STORIES).save_pretrained(tmp_path / "saved")
    result = run("quantize", tmp_path / "saved", tmp_path / "out", "--calib-samples", "1", "--calib-seq-len", "16", "-q")
    assert_one_line_error(result, "no tokenizer in the folder")
    assert result.stderr.strip().endswith("copy the tokenizer files of the model it came from into it")


def test_an_old_non_zip_torch_bin_is_a_valid_source(tmp_path):
    model = tiny_model("llama")
    src = save_tiny(model, tmp_path / "src")
    (src / "model.safetensors").unlink()
    torch.save(model.state_dict(), src / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    result = run("quantize", src, tmp_path / "out", "--calib-samples", "0", "-q")
    assert result.exit_code == 0, result.stderr


@needs_stories
@needs_data
def test_plot_into_a_missing_or_read_only_folder_fails_before_the_analysis(tmp_path, monkeypatch):
    monkeypatch.setattr("llmint8_cli.activations.collect", lambda *a, **k: pytest.fail("the analysis ran first"))
    assert_one_line_error(run("outliers", STORIES, "--plot", tmp_path / "missing" / "o.png", "-q"), "does not exist")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root writes anywhere: the check cannot be staged as root
            assert_one_line_error(run("outliers", STORIES, "--plot", locked / "o.png", "-q"), "not writable")
    finally:
        locked.chmod(0o700)
    (tmp_path / "o.png").write_bytes(b"mine")
    assert_one_line_error(run("outliers", STORIES, "--plot", tmp_path / "o.png", "-q"), "exists already")


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_a_seed_out_of_range_is_one_line(seed):
    assert_one_line_error(run("generate", "unused", "prompt", "--seed", seed), "--seed")


def test_a_closed_or_full_stdout_is_one_line(monkeypatch):
    from llmint8_cli.cli.common import emit_json
    from llmint8_cli.errors import InvalidArgumentError

    monkeypatch.setattr(sys, "stdout", None)
    with pytest.raises(InvalidArgumentError, match="it is closed"):
        emit_json("x", None, {})


@pytest.mark.parametrize("stdout", ["full", "closed"])
def test_a_full_or_closed_stdout_is_exit_2_in_a_real_process(tmp_path, int8_folder, stdout):
    if stdout == "full" and not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    with open("/dev/full" if stdout == "full" else os.devnull, "w") as target:
        done = subprocess.run([sys.executable, "-m", "llmint8_cli", "export", str(int8_folder), str(tmp_path / "bnb"), "-q"], cwd=ROOT, stdout=target,
                              stderr=subprocess.PIPE, text=True, timeout=300, preexec_fn=(lambda: os.close(1)) if stdout == "closed" else None)
    why = "No space left on device" if stdout == "full" else "it is closed"
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [f"llmint8: error: cannot write the JSON result to stdout: {why}"]


@needs_data
def test_lm_eval_with_a_bad_llmint8_path_is_one_line(tmp_path):
    result = run("lm-eval", "--model", "llmint8", "--model_args", f"path={tmp_path / 'nowhere'}", "--tasks", "piqa", "--limit", "1")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if "error" in line] == [
        f"llmint8: error: {tmp_path / 'nowhere'}: not an llmint8 checkpoint (no quantization_config with quant_method 'llmint8' in config.json)"
    ]


# -- resources and debris ------------------------------------------------------------------------


@needs_stories
def test_generating_past_the_context_is_refused(monkeypatch):
    monkeypatch.setattr("transformers.GenerationMixin.generate", lambda *a, **k: pytest.fail("generation started"))
    assert_one_line_error(run("generate", STORIES, "Once", "--max-new-tokens", "100000", "-q"), "exceed the model's context (2048 tokens)")


def test_a_huge_stdin_is_refused_without_reading_it_all():
    from llmint8_cli.cli.common import STDIN_LIMIT

    result = subprocess.run([sys.executable, "-m", "llmint8_cli", "eval-ppl", "-q"], cwd=ROOT, input="x" * (3 * STDIN_LIMIT),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "stdin holds more than 1 MiB" in result.stderr


@needs_stories
@needs_data
def test_zero_shot_runs_leave_no_task_folder_even_when_terminated(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    args = [sys.executable, "-m", "llmint8_cli", "eval-zeroshot", str(STORIES), "--tasks", "piqa", "--limit", "2", "--methods", "fp16", "--data-dir", str(DATA)]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.glob("llmint8-tasks-*"))
    process = subprocess.Popen([*args, "--limit", "400"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # the evaluation has begun once the variant's line is out
        if "piqa" in line:
            break
    assert list(tmp_path.glob("llmint8-tasks-*"))
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    assert not list(tmp_path.glob("llmint8-tasks-*"))


def test_messages_name_real_sizes_and_files(tmp_path):
    from llmint8_cli.checkpoint.output import human_size
    from llmint8_cli.evaluation.perplexity import make_windows

    assert [human_size(n) for n in (0, 812, 410_409, 13 << 30)] == ["0 B", "812 B", "400.8 KiB", "13.0 GiB"]
    with pytest.raises(DataError, match="^notes.txt has 5 tokens, shorter than one window of 10$"):
        make_windows(list(range(5)), 10, source="notes.txt")


# -- cache files are ours ------------------------------------------------------------------------


def cached_run(tmp_path: Path, command: str):
    """A first run that fills a cache, and the arguments to run it again."""
    model = tiny_task_model(tmp_path / "model")
    (tmp_path / "text.txt").write_text("Once upon a time there was a cat. " * 20)
    (tmp_path / "data" / "piqa").mkdir(parents=True)
    (tmp_path / "data" / "piqa" / "validation.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PIQA_ROWS))
    extra = {"eval-ppl": ["--dataset", tmp_path / "text.txt", "--seq-len", "16"], "eval-zeroshot": ["--tasks", "piqa", "--data-dir", tmp_path / "data"]}[command]
    args = [command, model, *extra, "--methods", "fp16", "--cache-dir", tmp_path / "cache", "-q"]
    first = run(*args)
    assert first.exit_code == 0, first.stderr
    return args, next((tmp_path / "cache").rglob("*.jsonl"))


@pytest.mark.parametrize(("command", "kind"), [("eval-ppl", "symlink"), ("eval-ppl", "hard link"), ("eval-ppl", "folder"), ("eval-zeroshot", "symlink")])
def test_a_cache_file_that_is_not_ours_is_refused_and_the_users_file_is_untouched(tmp_path, command, kind):
    """A cache file linked to a user's file was cut to its complete lines through the link."""
    args, cache = cached_run(tmp_path, command)
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes\nhalf a line")
    cache.unlink()
    {"symlink": lambda: cache.symlink_to(mine), "hard link": lambda: os.link(mine, cache), "folder": cache.mkdir}[kind]()
    result = run(*args)
    assert_one_line_error(result, f"{cache}: cannot use it as a cache file")
    assert mine.read_text() == "my notes\nhalf a line"


def test_a_full_disk_under_the_cache_is_one_line(tmp_path, monkeypatch):
    import errno

    args, cache = cached_run(tmp_path, "eval-ppl")
    cache.unlink()

    def full(descriptor, *rest, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("llmint8_cli.data.os.fdopen", full)
    assert_one_line_error(run(*args), f"{cache}: cannot write the cache file: No space left on device")


# -- an llmint8 folder is what its tensors say -----------------------------------------------------


def edited_config(folder: Path, change) -> Path:
    """The folder's config changed and its manifest written again, as a careful tamperer would."""
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    write_manifest(folder)
    return folder


@pytest.mark.parametrize("edit", ["block removed", "quant_method renamed"])
def test_a_folder_whose_config_lost_its_block_is_recognised_by_its_tensors(copy_of, tmp_path, monkeypatch, edit):
    """It loaded as a 16-bit model holding int8 values (exit 0) through every loader."""
    from transformers import AutoModelForCausalLM

    change = (lambda c: c.pop("quantization_config")) if edit == "block removed" else (lambda c: c["quantization_config"].update(quant_method="llmint9"))
    folder = copy_of()
    tiny_tokenizer().save_pretrained(folder)
    edited_config(folder, change)
    words = "the folder holds llmint8 tensors (int8 weights, weight_scale, outlier_idx) but its config has no quantization_config"
    for loader in (llmint8_cli.load, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(CheckpointError, match=re.escape(words)):
            loader(folder)
    (tmp_path / "text.txt").write_text("Once upon a time there was a cat. " * 20)
    assert_one_line_error(run("eval-ppl", folder, "--dataset", tmp_path / "text.txt", "--seq-len", "16", "-q"), words)
    assert_one_line_error(run("generate", folder, "Once", "-q"), words)
    (tmp_path / "data" / "piqa").mkdir(parents=True)
    (tmp_path / "data" / "piqa" / "validation.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PIQA_ROWS))
    monkeypatch.setenv("LLMINT8_DATA_DIR", str(tmp_path / "data"))
    result = run("lm-eval", "--model", "hf", "--model_args", f"pretrained={folder}", "--tasks", "piqa", "--limit", "1")
    errors = [line for line in result.stderr.splitlines() if line.startswith("llmint8: error:")]
    renamed = "Unknown quantization type, got llmint9"  # lm-eval's HFLM asks transformers for the block's type first, which refuses it
    assert result.exit_code == 2 and len(errors) == 1 and (f"{folder / 'config.json'}: {words}" in errors[0] or renamed in errors[0]), result.stderr


def test_a_config_with_a_million_layers_is_refused_before_it_is_built(tmp_path, int8_folder):
    """transformers built every layer before any check (hours); the weights say how many there are."""
    from transformers import AutoModelForCausalLM

    src = edited_config(Path(shutil.copytree(int8_folder.parent / "src", tmp_path / "src")), lambda c: c.update(num_hidden_layers=10**6))
    words = "num_hidden_layers is 1000000, but the weights hold 2 layers"
    assert_one_line_error(run("quantize", src, tmp_path / "out", "--calib-samples", "0", "-q"), words)
    assert not (tmp_path / "out").exists()
    folder = edited_config(Path(shutil.copytree(int8_folder, tmp_path / "int8")), lambda c: c.update(num_hidden_layers=10**6))
    for loader in (llmint8_cli.load, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(llmint8_cli.LLMInt8Error, match=words):
            loader(folder)
    tiny_tokenizer().save_pretrained(src)
    (tmp_path / "text.txt").write_text("Once upon a time there was a cat. " * 20)
    assert_one_line_error(run("eval-ppl", src, "--dataset", tmp_path / "text.txt", "--seq-len", "16", "--calib-samples", "0", "-q"), words)


# -- bounded resources, and exit 2 where exit 1 was ----------------------------------------------


def overlapping_header(src: Path) -> None:
    """Two tensors of one size made to share their bytes in the safetensors header."""
    import struct

    raw = (src / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    first, second = [key for key in header if key.endswith("input_layernorm.weight")][:2]
    header[second]["data_offsets"] = header[first]["data_offsets"]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    text += b" " * (length - len(text))
    (src / "model.safetensors").write_bytes(raw[:8] + text + raw[8 + length :])


@pytest.mark.parametrize(("damage", "words"), [
    (overlapping_header, "overlap"),
    (lambda src: (src / "model.safetensors.index.json").write_text('{"weight_map": ["model.safetensors"]}'), "\"weight_map\" must be an object"),
    (lambda src: (src / "model.safetensors.index.json").write_text('{"weight_map": {"x": "../../etc/passwd"}}'), "\"weight_map\" must be an object"),
])
def test_a_damaged_safetensors_source_is_one_line(tmp_path, int8_folder, damage, words):
    src = Path(shutil.copytree(int8_folder.parent / "src", tmp_path / "src"))
    damage(src)
    assert_one_line_error(run("quantize", src, tmp_path / "out", "--calib-samples", "0", "-q"), words)
    assert not (tmp_path / "out").exists()


def test_more_calibration_windows_than_the_text_holds_is_refused_at_once(tmp_path, int8_folder):
    """--calib-samples 1000000000 calibrated over the whole text for hours."""
    src = Path(shutil.copytree(int8_folder.parent / "src", tmp_path / "src"))
    tiny_tokenizer().save_pretrained(src)
    (tmp_path / "calib.txt").write_text("Once upon a time there was a cat. " * 40)
    result = run("quantize", src, tmp_path / "out", "--calib-samples", "1000000000", "--calib-seq-len", "64", "--calib-dataset", tmp_path / "calib.txt", "-q")
    assert_one_line_error(result, "--calib-samples 1000000000: the calibration text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "src"]


def test_bench_past_the_context_is_refused_before_any_timing(tmp_path, monkeypatch):
    monkeypatch.setattr("llmint8_cli.evaluation.speed.bench_models", lambda *a, **k: pytest.fail("timing started"))
    model = tiny_task_model(tmp_path / "model")
    result = run("bench", model, "--prompt-tokens", "250", "--new-tokens", "32", "--calib-samples", "0", "-q")
    assert_one_line_error(result, "--prompt-tokens 250 and --new-tokens 32 exceed the model's context (256 tokens)")


@pytest.mark.parametrize(("content", "words"), [("sparse 2 GiB", "more text than llmint8 reads (1 GiB)"), ("NUL bytes", "holds NUL bytes"),
                                                 ("/proc/self/mem", "cannot read it")])
def test_a_dataset_that_is_not_readable_text_is_one_line(tmp_path, content, words):
    """A 2 GiB file of NUL bytes aborted the process in the tokenizer (exit -6)."""
    model = tiny_task_model(tmp_path / "model")
    dataset = tmp_path / "data.txt"
    if content == "sparse 2 GiB":
        with dataset.open("wb") as handle:
            handle.truncate(2 << 30)
    elif content == "NUL bytes":
        dataset.write_bytes(b"text\0" * 100)
    else:
        dataset = Path("/proc/self/mem")
        if not dataset.exists():
            pytest.skip("no /proc")
    assert_one_line_error(run("eval-ppl", model, "--dataset", dataset, "--seq-len", "16", "--calib-samples", "0", "-q"), words)


def test_an_unreadable_weight_file_is_one_line(tmp_path, int8_folder):
    if not Path("/proc/self/mem").exists():
        pytest.skip("no /proc")
    src = Path(shutil.copytree(int8_folder.parent / "src", tmp_path / "src"))
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").symlink_to("/proc/self/mem")  # opens, and every read fails
    assert_one_line_error(run("quantize", src, tmp_path / "out", "--calib-samples", "0", "-q"), "model.safetensors: cannot read it")


@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_a_deleted_or_garbage_tokenizer_is_one_line(tmp_path, damage):
    model = tiny_task_model(tmp_path / "model")
    assert run("quantize", model, tmp_path / "int8", "--calib-samples", "0", "-q").exit_code == 0
    for name in ("tokenizer.json", "tokenizer_config.json") if damage == "deleted" else ("tokenizer.json",):
        if damage == "deleted":
            (tmp_path / "int8" / name).unlink()
        else:
            (tmp_path / "int8" / name).write_bytes(b"\x89PNG garbage")
    (tmp_path / "text.txt").write_text("Once upon a time there was a cat. " * 20)
    for command in (["eval-ppl", tmp_path / "int8", "--dataset", tmp_path / "text.txt", "--seq-len", "16"], ["generate", tmp_path / "int8", "Once"]):
        assert_one_line_error(run(*command, "--no-verify", "-q"), str(tmp_path / "int8"))


@pytest.mark.parametrize(("option", "value", "words"), [
    ("--device-map", "binary.json", "--device-map must be one of"),
    ("--offload-folder", "a-file/off", "--offload-folder"),
    ("--temperature", "inf", "--temperature must be a finite number"),
    ("--temperature", "nan", "--temperature"),
])
def test_options_outside_their_domain_are_one_line(tmp_path, monkeypatch, option, value, words):
    monkeypatch.chdir(tmp_path)
    Path("binary.json").write_bytes(b"\xff\xfe\x00garbage")
    Path("a-file").write_text("not a folder")
    placement = ["--device-map", "auto"] if option == "--offload-folder" else []
    assert_one_line_error(run("generate", "unused-model", "Once", *placement, option, value, "-q"), words)


@pytest.mark.parametrize("stdin", [b"\xff\xfe\x00\x01 binary", b"[" * 100_000 + b"]" * 100_000])
def test_stdin_that_is_no_json_document_is_one_line(stdin):
    result = subprocess.run([sys.executable, "-m", "llmint8_cli", "eval-ppl", "-q"], cwd=ROOT, input=stdin, capture_output=True, timeout=120)
    assert result.returncode == 2 and result.stderr.decode().startswith("llmint8: error: stdin is not an llmint8 JSON document"), result.stderr[-500:]
    assert len(result.stderr.decode().strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["--version"], ["-h"], ["quantize", "-h"]])
def test_help_and_version_into_a_full_stdout_are_one_line(args):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "llmint8_cli", *args], cwd=ROOT, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == ["llmint8: error: cannot write to stdout: No space left on device"]


def test_an_interrupted_quantize_leaves_no_folder_it_made(tmp_path, int8_folder, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("llmint8_cli.checkpoint.quantize.write_tensors", interrupted)
    result = run("quantize", int8_folder.parent / "src", tmp_path / "a" / "b" / "c" / "out", "--calib-samples", "0", "-q")
    assert result.exit_code == 130 and list(tmp_path.iterdir()) == []


def test_a_plan_cache_naming_an_unknown_gemm_path_is_measured_again(tmp_path, monkeypatch):
    from llmint8_cli.backends import cpu_kernels

    monkeypatch.setenv("LLMINT8_CACHE_DIR", str(tmp_path))
    cpu_kernels.decision.cache_clear()
    try:
        good = cpu_kernels.decision((64, 64))
        cached = json.loads(cpu_kernels.cache_file().read_text())
        entry = next(iter(cached.values()))["shapes"]["64x64"]
        entry["fused"] = [[None, "rm -rf /"]]
        cpu_kernels.cache_file().write_text(json.dumps(cached))
        cpu_kernels.decision.cache_clear()
        again = cpu_kernels.decision((64, 64))
        assert {name for _, name in again["fused"]} <= set(cpu_kernels.PATHS) and set(again["timings_ms"]) == set(good["timings_ms"])
        assert next(iter(json.loads(cpu_kernels.cache_file().read_text()).values()))["shapes"]["64x64"]["fused"] == again["fused"]
    finally:
        cpu_kernels.decision.cache_clear()
