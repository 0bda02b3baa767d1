"""On-the-fly evaluation calibrates as `quantize` does, so that its numbers are the folder's."""

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from conftest import DATA, STORIES, needs_data, needs_stories
from llmint8_cli import Int8Linear, load
from llmint8_cli.checkpoint.quantize import QuantizeOptions, quantize_checkpoint
from llmint8_cli.cli import app
from llmint8_cli.core.methods import get_method
from llmint8_cli.errors import InvalidArgumentError
from llmint8_cli.evaluation import variants

RUNNER = CliRunner()
CALIBRATION = QuantizeOptions(calib_samples=4, calib_seq_len=128, calib_dataset="ptb", data_dir=str(DATA))


def stored_columns(model) -> dict:
    return {n: m.outlier_idx.tolist() for n, m in model.named_modules() if isinstance(m, Int8Linear)}


@needs_stories
@needs_data
def test_on_the_fly_variants_store_the_columns_quantize_stores(tmp_path):
    quantize_checkpoint(str(STORIES), tmp_path / "out", CALIBRATION)
    subject = variants.subject(str(STORIES), [get_method("llm.int8"), get_method("vectorwise")], 6.0, torch.float32, torch.device("cpu"), calibration=CALIBRATION)
    built = dict(subject.variants)
    expected = stored_columns(load(tmp_path / "out"))
    assert sum(len(v) for v in expected.values()) > 0 and stored_columns(built["llm.int8"]) == expected
    assert all(not columns for columns in stored_columns(built["vectorwise"]).values())  # no decomposition, nothing stored
    assert subject.calibration_of("llm.int8")["outlier_columns_total"] == sum(len(v) for v in expected.values())
    assert subject.calibration_of("vectorwise") is None and subject.calibration_key == "calib4x128-ptb"


@needs_stories
@needs_data
def test_calibration_never_reads_the_evaluation_text(tmp_path):
    ptb = str(DATA / "ptb" / "ptb.test.txt")
    with pytest.raises(InvalidArgumentError, match="is the evaluation text"):
        variants.subject(str(STORIES), [get_method("llm.int8")], 6.0, torch.float32, torch.device("cpu"), calibration=CALIBRATION, held_out=ptb)
    result = RUNNER.invoke(app, ["eval-ppl", str(STORIES), "--dataset", "c4", "--seq-len", "128", "--max-tokens", "512", "--calib-samples", "2", "--data-dir", str(DATA), "-q"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    calibration = document["results"]["llm.int8"]["calibration"]
    assert calibration["dataset"] == "wikitext2" and "is the evaluation text" in calibration["note"]  # offline the default falls back to C4
    assert document["results"]["fp16"]["calibration"] is None


@needs_stories
@needs_data
def test_calib_samples_0_keeps_run_time_detection_and_its_cache(tmp_path):
    args = ["eval-ppl", str(STORIES), "--dataset", "ptb", "--seq-len", "128", "--max-tokens", "640", "--data-dir", str(DATA), "--cache-dir", str(tmp_path), "-q"]
    runtime = json.loads(RUNNER.invoke(app, [*args, "--calib-samples", "0"]).stdout)
    calibrated = json.loads(RUNNER.invoke(app, [*args, "--calib-samples", "4", "--calib-dataset", "c4"]).stdout)
    assert runtime["results"]["llm.int8"]["calibration"] is None and calibrated["results"]["llm.int8"]["calibration"]["samples"] == 4
    folders = sorted(p.name for p in next(tmp_path.iterdir()).iterdir())
    assert folders == ["fp16-float32-cpu", "llm.int8-t6-calib4x512-c4-float32-cpu", "llm.int8-t6-float32-cpu"]
    assert calibrated["results"]["fp16"]["reused_windows"] == 5  # the baseline is read back, not run again


@needs_stories
@needs_data
def test_a_stored_folder_keeps_its_cache_names(tmp_path):
    quantize_checkpoint(str(STORIES), tmp_path / "int8", CALIBRATION)
    subject = variants.subject(str(tmp_path / "int8"), [get_method("llm.int8")], 6.0, torch.float32, torch.device("cpu"), calibration=CALIBRATION)
    assert subject.calibration_of("llm.int8")["samples"] == 4 and subject.calibration_key == ""
    folder = variants.cache_folder(str(tmp_path / "cache"), subject, "llm.int8", torch.float32, torch.device("cpu"))
    assert folder.name == "llm.int8-t6-float32-cpu"


@needs_stories
@needs_data
def test_each_method_runs_at_its_own_default_threshold(tmp_path):
    rotate = get_method("llm.int8-rotate")
    summary = quantize_checkpoint(str(STORIES), tmp_path / "rot", replace(CALIBRATION, method=rotate.name))
    assert summary["threshold"] == rotate.default_threshold == 60.0
    subject = variants.subject(str(STORIES), [get_method("llm.int8"), rotate], None, torch.float32, torch.device("cpu"), calibration=CALIBRATION)
    assert subject.thresholds == {"llm.int8": 6.0, "llm.int8-rotate": 60.0}
    built = dict(subject.variants)
    assert stored_columns(built[rotate.name]) == stored_columns(load(tmp_path / "rot"))  # one calibration pass, each method's own columns
    assert {m.threshold for m in built[rotate.name].modules() if isinstance(m, Int8Linear)} == {60.0}
    at_6, at_60 = (subject.calibration_of(name)["outlier_columns_total"] for name in ("llm.int8", rotate.name))
    assert at_6 > at_60 == summary["outlier_columns_total"]
    names = [variants.cache_folder(str(tmp_path / "cache"), subject, name, torch.float32, torch.device("cpu")).name for name in ("llm.int8", rotate.name)]
    assert names == ["llm.int8-t6-calib4x128-ptb-float32-cpu", "llm.int8-rotate-t60-calib4x128-ptb-r256-float32-cpu"]
    assert f"{at_6} at threshold 6, {at_60} at threshold 60" in variants.calibration_line(subject)
