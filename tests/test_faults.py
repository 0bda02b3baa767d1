"""Fault injection: outputs that would lose data, kills mid-write, and what the next run cleans up."""

import json
import os
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ROOT, save_tiny, tiny_model
from llmint8_cli.checkpoint.manifest import MANIFEST, PARTIAL_MARKER
from llmint8_cli.checkpoint import output
from llmint8_cli.cli import app

RUNNER = CliRunner()


def quantize(*args: str):
    return RUNNER.invoke(app, ["quantize", *map(str, args), "--calib-samples", "0", "-q"])


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(result, words: str, code: int = 2) -> None:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmint8: error:") and words in lines[0], result.stderr


@pytest.fixture
def src(tmp_path):
    return save_tiny(tiny_model("llama"), tmp_path / "models" / "src")


def test_output_holding_the_source_is_refused_even_with_force(tmp_path, src):
    before = tree(src)
    for out in (src.parent, tmp_path, src):
        assert_one_line_error(quantize(src, out, "--force"), "holds" if out != src else "inside the source")
    assert tree(src) == before and not list(tmp_path.rglob(".*tmp-*"))


def test_output_inside_the_source_is_refused(src):
    assert_one_line_error(quantize(src, src / "int8"), "inside the source")
    assert not (src / "int8").exists()


def test_symlinks_are_followed(tmp_path, src):
    before = tree(src)
    link = tmp_path / "link-to-src"
    link.symlink_to(src)
    assert_one_line_error(quantize(src, link, "--force"), "inside the source")
    assert tree(src) == before and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link-to-src", "models"]  # no .old-/.tmp- debris


def test_force_replaces_only_an_llmint8_output_or_an_empty_folder(tmp_path, src):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    (other / "ckpt").mkdir()
    assert_one_line_error(quantize(src, other, "--force"), "not an llmint8 output")
    assert (other / "notes.txt").read_text() == "mine" and (other / "ckpt").is_dir()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert quantize(src, empty, "--force").exit_code == 0 and (empty / MANIFEST).is_file()
    first = (empty / MANIFEST).read_bytes()
    result = quantize(src, empty, "--force", "--method", "absmax")
    assert result.exit_code == 0, result.stderr
    assert json.loads((empty / "config.json").read_text())["quantization_config"]["method"] == "absmax"
    assert (empty / MANIFEST).read_bytes() != first
    assert not (empty / PARTIAL_MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "models", "other"]


def test_force_through_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path, src):
    target = tmp_path / "store" / "int8"
    assert quantize(src, target).exit_code == 0
    link = tmp_path / "int8"
    link.symlink_to(target)
    result = quantize(src, link, "--force", "--method", "absmax")
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink() and json.loads((link / "config.json").read_text())["quantization_config"]["method"] == "absmax"
    assert sorted(p.name for p in target.parent.iterdir()) == ["int8"]


def test_output_not_writable_fails_before_calibration(tmp_path, src, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("calibration ran before the output was checked")

    monkeypatch.setattr("llmint8_cli.checkpoint.quantize.calibrate", never)
    (tmp_path / "afile").write_text("x")
    result = RUNNER.invoke(app, ["quantize", str(src), str(tmp_path / "afile" / "out"), "-q"])
    assert_one_line_error(result, "cannot write")


def test_not_enough_space_is_refused_before_writing(tmp_path, src, monkeypatch):
    monkeypatch.setattr("shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    assert_one_line_error(quantize(src, tmp_path / "out"), "not enough free space")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


KILLABLE = """
import sys, time
import llmint8_cli.checkpoint.writer as w
real = w.write_shard
def slow(path, shard, on_group=None):
    def step(group):
        print("writing", flush=True)
        time.sleep(0.2)
    return real(path, shard, step)
w.write_shard = slow
from llmint8_cli.cli import main
sys.argv = ["llmint8", "quantize", *sys.argv[1:], "--calib-samples", "0", "-q"]
main()
"""


def start_and_kill(src: Path, out: Path, signum: int, *extra: str) -> subprocess.CompletedProcess:
    """Run a real `llmint8 quantize`, slowed per tensor group, and send it signum once it writes."""
    # A shell's background job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt: restore the default.
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(src), str(out), *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def debris(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_sigint_sigterm_and_sighup_mid_write_leave_nothing(tmp_path, src, signum):
    out = tmp_path / "out"
    killed = start_and_kill(src, out, signum)
    assert killed.returncode == 128 + signum, killed.stderr
    words = "interrupted" if signum == signal.SIGINT else f"terminated by {signal.Signals(signum).name}"
    assert killed.stderr.strip() == f"llmint8: error: {words}"
    assert not out.exists() and debris(out) == []


def test_sigterm_during_force_keeps_the_old_output(tmp_path, src):
    out = tmp_path / "out"
    assert quantize(src, out).exit_code == 0
    before = tree(out)
    killed = start_and_kill(src, out, signal.SIGTERM, "--force", "--method", "absmax")
    assert killed.returncode == 143 and tree(out) == before and debris(out) == []


def test_sigkill_debris_is_removed_by_the_next_run(tmp_path, src):
    out = tmp_path / "out"
    killed = start_and_kill(src, out, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    left = debris(out)
    assert len(left) == 1 and not out.exists()
    assert (out.parent / left[0] / PARTIAL_MARKER).is_file()
    assert quantize(src, out).exit_code == 0
    assert debris(out) == [] and (out / MANIFEST).is_file()


def test_stale_cleanup_spares_live_writers_and_foreign_folders(tmp_path):
    out = tmp_path / "out"
    live = output.make_temporary(out)  # this process: alive
    gone = tmp_path / f".out.tmp-999999999-1-{'ab' * 4}"  # a pid beyond pid_max: gone
    gone.mkdir()
    (gone / PARTIAL_MARKER).write_text(output.marker_text("tmp", gone.name))
    reused = tmp_path / f".out.tmp-{os.getpid()}-1-{'cd' * 4}"  # our pid, another start time: gone
    reused.mkdir()
    (reused / PARTIAL_MARKER).write_text(output.marker_text("tmp", reused.name))
    foreign = tmp_path / f".out.tmp-999999999-1-{'ef' * 4}"  # our name pattern, but no marker: not ours
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"x")
    other_out = tmp_path / f".other.tmp-999999999-1-{'ab' * 4}"
    other_out.mkdir()
    (other_out / PARTIAL_MARKER).write_text(output.marker_text("tmp", other_out.name))
    removed = output.remove_stale(out)
    expected = [gone, reused] if output._process_start(os.getpid()) else [gone]
    assert sorted(removed) == sorted(expected)
    assert live.is_dir() and foreign.is_dir() and other_out.is_dir()


def test_a_concurrent_writer_does_not_overwrite_without_force(tmp_path, src, monkeypatch):
    """Another run wrote OUT while this one worked: without --force this one gives way."""
    out = tmp_path / "out"
    real = output.install

    def racing(tmp, target, force):
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
        real(tmp, target, force)

    monkeypatch.setattr("llmint8_cli.checkpoint.output.install", racing)
    assert_one_line_error(quantize(src, out), "exists already")
    assert (out / "theirs.txt").read_text() == "theirs" and debris(out) == []
