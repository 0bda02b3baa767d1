"""Evaluations larger than one process (issue #46, part 2): torchrun with gloo on the CPU, in real
processes. Two processes give the figures of one, to the last digit; a rank that dies ends the
run with one line and a non-zero exit."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import DATA, STORIES, needs_data, needs_stories, save_tiny, tiny_model, tiny_tokenizer

TEXT = "Once upon a time there was a little girl who liked to play in the park with her small dog. " * 60
CALIBRATION = TEXT.upper()


@pytest.fixture(scope="module")
def model_and_texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    src = save_tiny(tiny_model("llama", outlier_scale=20.0).half(), root / "src")
    tiny_tokenizer().save_pretrained(src)
    (root / "text.txt").write_text(TEXT)
    (root / "calibration.txt").write_text(CALIBRATION)
    return src, root / "text.txt", root / "calibration.txt"


def environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def eval_ppl(processes: int, model, text, calibration, cache) -> dict:
    args = ["eval-ppl", str(model), "--dataset", str(text), "--seq-len", "48", "--methods", "llm.int8,vectorwise", "--calib-samples", "2",
            "--calib-seq-len", "48", "--calib-dataset", str(calibration), "--cache-dir", str(cache), "-q"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)] if processes > 1 else [sys.executable]
    done = subprocess.run([*launcher, "-m", "llmint8_cli", *args], capture_output=True, text=True, env=environment(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def window_nlls(cache) -> dict:
    """Every window's NLL as written, whichever process wrote it."""
    found = {}
    for path in sorted(cache.rglob("ppl-*.jsonl")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            found[(path.parent.name, entry["window"])] = entry["nll"]
    return found


def test_two_processes_give_the_figures_of_one_to_the_last_digit(model_and_texts, tmp_path):
    model, text, calibration = model_and_texts
    one = eval_ppl(1, model, text, calibration, tmp_path / "one")
    two = eval_ppl(2, model, text, calibration, tmp_path / "two")
    assert one["processes"] == 1 and two["processes"] == 2
    assert window_nlls(tmp_path / "one") == window_nlls(tmp_path / "two")  # every window, every digit
    assert len(list((tmp_path / "two").rglob("ppl-*.rank1.jsonl"))) == 3  # one file per process and variant: no two write one file
    for name, row in one["results"].items():
        assert (two["results"][name]["ppl"], two["results"][name]["nll"]) == (row["ppl"], row["nll"]), name
        assert two["results"][name]["calibration"] == row["calibration"], name  # calibrated once, the same stored columns
    resumed = eval_ppl(1, model, text, calibration, tmp_path / "two")  # a stopped two-process run resumes in one
    for name, row in one["results"].items():
        assert resumed["results"][name]["reused_windows"] == one["protocol"]["windows"] and resumed["results"][name]["ppl"] == row["ppl"], name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_that_dies_ends_the_run_with_one_line_not_a_hang(model_and_texts, tmp_path):
    model, text, calibration = model_and_texts
    base = environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", LLMINT8_DIST_TIMEOUT="15")
    args = [sys.executable, "-m", "llmint8_cli", "eval-ppl", str(model), "--dataset", str(text), "--seq-len", "48", "--calib-samples", "0", "-q"]
    started = time.monotonic()
    survivor = subprocess.Popen(args, env={**base, "RANK": "0", "LOCAL_RANK": "0"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(args, env={**base, "RANK": "1", "LOCAL_RANK": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)
    victim.send_signal(signal.SIGKILL)
    out, err = survivor.communicate(timeout=90)
    assert survivor.returncode not in (0, None) and time.monotonic() - started < 60
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmint8: error: rank 0 of 2: ") and "LLMINT8_DIST_TIMEOUT" in lines[0], err
    assert out == ""


def test_a_world_size_without_a_launcher_is_one_line(model_and_texts):
    model, text, _ = model_and_texts
    done = subprocess.run([sys.executable, "-m", "llmint8_cli", "eval-ppl", str(model), "--dataset", str(text), "--seq-len", "48", "-q"],
                          capture_output=True, text=True, env=environment(WORLD_SIZE="2", RANK="0"), timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == (
        "llmint8: error: WORLD_SIZE=2 but MASTER_ADDR, MASTER_PORT unset: start a multi-process run with torchrun (torchrun --nproc-per-node N -m llmint8_cli ...)")


@pytest.mark.slow  # 20-35 s: the default suite stays under 15 minutes; its eval-ppl twin runs there
@needs_stories
@needs_data
def test_two_processes_give_the_zero_shot_figures_of_one(tmp_path):
    """lm-eval shares the documents out; gathered back in document order, every figure (accuracies,
    LAMBADA's perplexity and its bootstrap stderr, the paired stderrs) is the one process's.
    --batch-size 1: the 16-bit model's sums otherwise depend on which requests share a padded batch."""
    def zeroshot(processes: int) -> dict:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)] if processes > 1 else [sys.executable]
        args = ["eval-zeroshot", str(STORIES), "--tasks", "piqa,lambada", "--limit", "9", "--methods", "llm.int8", "--calib-samples", "0",
                "--batch-size", "1", "--data-dir", str(DATA), "--cache-dir", str(tmp_path / str(processes)), "-q"]
        done = subprocess.run([*launcher, "-m", "llmint8_cli", *args], capture_output=True, text=True, env=environment(), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    one, two = zeroshot(1), zeroshot(2)
    assert two["processes"] == 2 and two["tasks"] == one["tasks"]
    assert "acc" in one["tasks"]["piqa"]["llm.int8"]["delta_stderr"] and one["tasks"]["lambada"]["fp16"]["perplexity_stderr"] > 0  # compared above
    assert len(list((tmp_path / "2").rglob("*.rank1.jsonl"))) == 2  # each process its own request cache per variant


def two_ranks(args: list[str], data_dirs: tuple, extra_env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Two processes of one run started by hand (as torchrun starts them), each with its own LLMINT8_DATA_DIR."""
    base = environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", LLMINT8_DIST_TIMEOUT="60", **(extra_env or {}))
    processes = [subprocess.Popen([sys.executable, "-m", "llmint8_cli", *args], env={**base, "RANK": str(r), "LOCAL_RANK": str(r), "LLMINT8_DATA_DIR": str(data_dirs[r])},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    return [subprocess.CompletedProcess(p.args, p.returncode, *output) for p, output in zip(processes, outputs)]


@pytest.mark.parametrize("command", ["eval-ppl", "eval-zeroshot"])
def test_ranks_that_read_different_data_are_refused_before_anything_is_summed(model_and_texts, tmp_path, command):
    """Rank 1's NLLs (or answers) of another text were once summed in silently: now every rank
    ends with one line naming what differs, exit 2, and nothing on stdout."""
    model, text, _ = model_and_texts
    folders = (tmp_path / "a", tmp_path / "b")
    for number, folder in enumerate(folders):
        (folder / "ptb").mkdir(parents=True)
        (folder / "ptb" / "ptb.test.txt").write_text(text.read_text() if number == 0 else text.read_text().replace("girl", "boy"))
        (folder / "piqa").mkdir()
        rows = [{"goal": f"Open jar {i}{' now' * number}", "sol1": "Twist.", "sol2": "Paint.", "label": i % 2} for i in range(4)]
        (folder / "piqa" / "validation.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = {"eval-ppl": ["--dataset", "ptb", "--seq-len", "48"], "eval-zeroshot": ["--tasks", "piqa"]}[command]
    done = two_ranks([command, str(model), *args, "--methods", "llm.int8", "--calib-samples", "0", "-q"], folders)
    what = {"eval-ppl": "the text's windows differ", "eval-zeroshot": "the task data differ"}[command]
    for process in done:
        assert process.returncode == 2 and process.stdout == "", process.stderr[-2000:]
        assert process.stderr.strip().splitlines() == [next(line for line in process.stderr.splitlines() if "rank 1 of 2 does not evaluate what rank 0 does" in line)]
        assert what in process.stderr
    same = two_ranks(["eval-ppl", str(model), "--dataset", "ptb", "--seq-len", "48", "--methods", "llm.int8", "--calib-samples", "0", "-q"], (folders[0], folders[0]))
    assert [p.returncode for p in same] == [0, 0] and json.loads(same[0].stdout)["processes"] == 2


@pytest.mark.parametrize(("name", "value"), [("LLMINT8_DIST_TIMEOUT", "nan"), ("LLMINT8_DIST_TIMEOUT", "inf"), ("RANK", "one"), ("WORLD_SIZE", "2.5"),
                                             ("RANK", "7")])
def test_distributed_settings_out_of_their_domain_are_one_line(model_and_texts, name, value):
    model, text, _ = model_and_texts
    env = {**environment(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", RANK="0"), name: value}
    done = subprocess.run([sys.executable, "-m", "llmint8_cli", "eval-ppl", str(model), "--dataset", str(text), "--seq-len", "48", "--calib-samples", "0", "-q"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and name in done.stderr, done.stderr[-2000:]
