"""Perplexity protocol: windows, BOS, stride, and `eval-ppl` against a direct computation."""

import json
import math
import os
import shutil

import pytest
import torch
from typer.testing import CliRunner

from conftest import STORIES, needs_data, needs_stories
from llmint8_cli import models
from llmint8_cli.cli import app
from llmint8_cli.errors import DataError
from llmint8_cli.evaluation.perplexity import IGNORE, make_windows

RUNNER = CliRunner()


def test_non_overlapping_windows_score_all_but_each_first_token():
    w = make_windows(list(range(100)), seq_len=10)
    assert w.input_ids.shape == (10, 10) and w.scored_tokens == 10 * 9
    assert w.input_ids[1, 0] == 10 and (w.labels[:, 0] == IGNORE).all()


def test_bos_per_window_is_context_only():
    w = make_windows(list(range(10, 100)), seq_len=10, bos_id=1)
    assert (w.input_ids[:, 0] == 1).all() and w.input_ids[1, 1] == 19
    assert (w.labels[:, :2] == IGNORE).all()  # neither the BOS nor the first text token is scored
    assert w.scored_tokens == 10 * 8


def test_sliding_windows_count_each_token_once():
    ids = list(range(100))
    w = make_windows(ids, seq_len=20, stride=5)
    scored = [int(t) for row in w.labels for t in row[1:] if t != IGNORE]
    assert len(scored) == len(set(scored)) == w.scored_tokens
    assert scored == sorted(scored) and scored[0] == 1 and scored[-1] == 99


def test_max_tokens_and_bad_protocols():
    assert make_windows(list(range(100)), seq_len=10, max_tokens=35).input_ids.shape == (3, 10)
    with pytest.raises(DataError, match="at least 2"):
        make_windows(list(range(10)), seq_len=1)
    with pytest.raises(DataError, match="shorter than one window"):
        make_windows(list(range(5)), seq_len=10)
    with pytest.raises(DataError, match="stride"):
        make_windows(list(range(50)), seq_len=10, stride=11)


@needs_stories
def test_eval_ppl_matches_transformers_loss(tmp_path):
    """Independent check: the sum of token NLLs from transformers' own loss, window by window."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "Once upon a time there was a little girl named Lily. She liked to play in the park with her dog. " * 30
    path = tmp_path / "story.txt"
    path.write_text(text)
    result = RUNNER.invoke(app, ["eval-ppl", str(STORIES), "--dataset", str(path), "--seq-len", "64", "--methods", "fp16", "--bos", "text", "-q", "--batch-size", "3"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    ids = tokenizer(text).input_ids
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 63, 64):
            window = torch.tensor([ids[start : start + 64]])
            total += model(window, labels=window).loss.item() * 63
            count += 63
    assert document["protocol"]["scored_tokens"] == count
    assert math.isclose(document["results"]["fp16"]["ppl"], math.exp(total / count), rel_tol=1e-4)


@needs_stories
@needs_data
def test_eval_ppl_all_methods_on_ptb_slice():
    result = RUNNER.invoke(app, ["eval-ppl", str(STORIES), "--dataset", "ptb", "--seq-len", "256", "--max-tokens", "4096", "--methods", "all", "-q", "--batch-size", "4"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    results = document["results"]
    assert list(results) == ["fp16", "absmax", "zeropoint", "rowwise", "vectorwise", "zp-vectorwise", "rowwise+decomp", "llm.int8", "llm.int8-zp", "llm.int8-smooth", "llm.int8-rotate"]
    assert results["fp16"]["delta_pct"] == 0.0
    assert results["llm.int8-smooth"]["calibration"]["smoothing_alpha"] == 0.5
    assert abs(results["llm.int8"]["delta_pct"]) < 2.0
    assert results["absmax"]["ppl"] > results["vectorwise"]["ppl"] > 0
    assert document["protocol"]["bos_per_window"] is True and document["dataset"]["sample"] is False


@needs_stories
@needs_data
def test_batch_size_does_not_change_results():
    def run(batch):
        result = RUNNER.invoke(app, ["eval-ppl", str(STORIES), "--dataset", "ptb", "--seq-len", "128", "--max-tokens", "1024", "--methods", "absmax,zeropoint,llm.int8", "-q", "--batch-size", batch])
        return {k: v["ppl"] for k, v in json.loads(result.stdout)["results"].items()}

    one, four = run("1"), run("4")
    for name in one:
        assert math.isclose(one[name], four[name], rel_tol=1e-4), name


@needs_stories
@needs_data
def test_cache_dir_reuses_windows_and_survives_a_killed_run(tmp_path):
    args = ["eval-ppl", str(STORIES), "--dataset", "ptb", "--seq-len", "128", "--max-tokens", "1024", "--methods", "llm.int8", "-q", "--cache-dir", str(tmp_path)]

    def run(*extra):
        result = RUNNER.invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    first = run()
    windows = first["protocol"]["windows"]
    first = first["results"]
    assert [first[m]["reused_windows"] for m in ("fp16", "llm.int8")] == [0, 0]
    again = run()["results"]
    assert again["llm.int8"]["reused_windows"] == windows and again["llm.int8"]["tokens_per_s"] is None
    assert again["llm.int8"]["ppl"] == first["llm.int8"]["ppl"]

    (int8_file,) = [p for p in tmp_path.rglob("ppl-*.jsonl") if "llm.int8" in str(p)]
    lines = int8_file.read_text().splitlines(keepends=True)
    int8_file.write_text("".join(lines[:3]) + lines[3][:10])  # as a run killed while writing
    resumed = run()["results"]
    assert resumed["llm.int8"]["reused_windows"] == 3 and math.isclose(resumed["llm.int8"]["ppl"], first["llm.int8"]["ppl"], rel_tol=1e-6)
    other = run("--threshold", "5")["results"]
    assert other["fp16"]["reused_windows"] == windows and other["llm.int8"]["reused_windows"] == 0

    moved = tmp_path / "elsewhere" / STORIES.name  # as in a fresh clone: same files, another place and time
    shutil.copytree(STORIES, moved)
    args[1] = str(moved)
    assert run()["results"]["llm.int8"]["reused_windows"] == windows


def test_model_fingerprint_follows_the_files_contents(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4096)
    key = lambda: models.fingerprint(models.ModelSource("folder", str(folder)))  # noqa: E731
    before = key()
    os.utime(folder / "model.safetensors", (0, 0))
    assert key() == before
    with (folder / "model.safetensors").open("r+b") as handle:
        handle.seek(500_000)
        handle.write(b"\x01")
    assert key() != before


@needs_stories
@needs_data
def test_redirected_stderr_gets_progress_lines():
    """No bar is drawn into a log file, so a long run writes a line per tenth of each method."""
    result = RUNNER.invoke(app, ["eval-ppl", str(STORIES), "--dataset", "ptb", "--seq-len", "128", "--max-tokens", "640", "--methods", "llm.int8"])
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("llm.int8: ")]
    assert [line.split(" (")[0] for line in lines] == [f"llm.int8: {n}/5" for n in range(1, 6)]
    assert "fp32 (16-bit): 5/5 (100 %)" in result.stderr  # the baseline named by the dtype it ran in


@needs_stories
@needs_data
def test_c4_sample_is_labelled():
    result = RUNNER.invoke(app, ["eval-ppl", str(STORIES), "--dataset", "c4", "--seq-len", "128", "--max-tokens", "512", "--methods", "fp16", "-q"])
    assert result.exit_code == 0, result.stderr
    dataset = json.loads(result.stdout)["dataset"]
    assert dataset["sample"] is True and "not the official" in dataset["note"]


@needs_stories
def test_eval_ppl_bad_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": oops}\n')
    no_text = tmp_path / "no-text.jsonl"
    no_text.write_text('{"text": "fine"}\n\n{"body": "where is text"}\n')
    cases = [
        (["--dataset", "wikitext103"], "unknown dataset"),
        (["--dataset", str(tmp_path / "missing.txt")], "missing.txt: no such file"),
        (["--dataset", str(tmp_path)], "a folder"),
        (["--dataset", str(bad_json)], "bad.jsonl:2: not valid JSON"),
        (["--dataset", str(no_text)], "no-text.jsonl:3: every JSON line needs a string field 'text'"),
        (["--dataset", str(short), "--batch-size", "0"], "Invalid value for '--batch-size'"),
        (["--dataset", str(short), "--max-tokens", "-3"], "Invalid value for '--max-tokens'"),
        (["--dataset", str(empty)], "empty"),
        (["--dataset", str(short), "--seq-len", "64"], "shorter than one window"),
        (["--dataset", str(short), "--seq-len", "1"], "at least 2"),
        (["--dataset", str(short), "--seq-len", "100000"], "longer than the model's context"),
        (["--dataset", str(short), "--methods", "int4"], "unknown method"),
    ]
    for extra, words in cases:
        result = RUNNER.invoke(app, ["eval-ppl", str(STORIES), *extra, "-q"])
        assert result.exit_code == 2, (extra, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("llmint8: error:") and words in lines[0], (extra, result.stderr)


@needs_stories
def test_a_perplexity_that_is_not_finite_is_null_with_a_reason_and_exit_3(tmp_path):
    """A model whose output overflows: the JSON stays valid (null, never a bare NaN) and the exit says so."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(STORIES, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.norm.weight"][0] = float("inf")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a little girl who liked to play in the park with her dog. " * 8)
    result = RUNNER.invoke(app, ["eval-ppl", str(broken), "--dataset", str(text), "--seq-len", "64", "--methods", "fp16", "-q"])
    assert result.exit_code == 3, result.stderr
    row = json.loads(result.stdout)["results"]["fp16"]
    assert row["ppl"] is None and row["nll"] is None and "NaN or Inf" in row["error"]
    assert result.stderr.strip() == f"llmint8: error: perplexity of fp16 is not finite: {row['error']}"


def test_offline_dataset_error_names_the_file(tmp_path):
    result = RUNNER.invoke(app, ["eval-ppl", "unused/model", "--dataset", "c4", "--data-dir", str(tmp_path), "-q"])
    assert result.exit_code == 2
    assert "c4/c4-validation.00000-of-00008.jsonl" in result.stderr and len(result.stderr.strip().splitlines()) == 1
