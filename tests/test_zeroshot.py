"""Local lm-eval tasks render the same prompts and metrics as lm-eval's built-in tasks."""

import json
import multiprocessing
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import DATA, STORIES, needs_data, needs_stories
from llmint8_cli.cli import app
from llmint8_cli.evaluation import zeroshot

RUNNER = CliRunner()


def first_docs(relative: str, count: int = 5) -> list[dict]:
    with (DATA / relative).open() as handle:
        return [json.loads(next(handle)) for _ in range(count)]


def local_tasks(names, folder):
    manager, task_names, _ = zeroshot.task_manager(names, str(DATA), True, folder)
    tasks = manager.load(list(task_names.values()))["tasks"]
    return {ours: tasks[theirs] for ours, theirs in task_names.items()}


def builtin_yaml(relative: str) -> dict:
    import lm_eval.tasks

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load((Path(lm_eval.tasks.__file__).parent / relative).read_text(), Loader=Loader)


@needs_data
def test_prompts_and_metrics_equal_lm_evals_own_tasks(tmp_path):
    from datasets import Dataset
    from lm_eval.tasks.hellaswag import utils as hellaswag_utils
    from lm_eval.tasks.winogrande import preprocess_winogrande as wino

    tasks = local_tasks(list(zeroshot.TASKS), tmp_path)

    hs = tasks["hellaswag"]
    processed = hellaswag_utils.process_docs(Dataset.from_list(first_docs("hellaswag/validation.jsonl")))
    for ours, theirs in zip(list(hs.validation_docs())[:5], processed):
        assert hs.doc_to_text(ours) == theirs["query"]
        assert hs.doc_to_choice(ours) == theirs["choices"]
        assert hs.doc_to_target(ours) == int(theirs["label"])

    wg = tasks["winogrande"]
    for ours, raw in zip(list(wg.validation_docs())[:5], first_docs("winogrande/validation.jsonl")):
        assert wg.doc_to_text(ours) == wino.doc_to_text(raw)
        assert wg.doc_to_target(ours) == wino.doc_to_target(raw)
        assert wg.doc_to_choice(ours) == wino.doc_to_choice(raw)

    pq = tasks["piqa"]
    for ours, raw in zip(list(pq.validation_docs())[:5], first_docs("piqa/validation.jsonl")):
        assert pq.doc_to_text(ours) == f"Question: {raw['goal']}\nAnswer:"
        assert pq.doc_to_choice(ours) == [raw["sol1"], raw["sol2"]]
        assert pq.doc_to_target(ours) == raw["label"]

    lb = tasks["lambada"]
    for ours, raw in zip(list(lb.test_docs())[:5], first_docs("lambada_openai/test.jsonl")):
        words = raw["text"].split(" ")
        assert lb.doc_to_text(ours) == " ".join(words[:-1])
        assert lb.doc_to_target(ours) == " " + words[-1]

    builtin = {"hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml", "piqa": "piqa/piqa.yaml", "lambada": "lambada/lambada_openai.yaml"}
    for name, relative in builtin.items():
        expected = [m["metric"] for m in builtin_yaml(relative)["metric_list"]]
        assert [m["metric"] for m in tasks[name].config.metric_list] == expected, name
        assert tasks[name].config.output_type == builtin_yaml(relative)["output_type"]
    assert len(list(hs.validation_docs())) == 10042 and len(list(lb.test_docs())) == 5153


@needs_stories
@needs_data
def test_eval_zeroshot_cli_with_limit(monkeypatch):
    def no_pool(*args, **kwargs):  # a forked pool under torch's threads can hang forever
        raise AssertionError("lm-eval's bootstrap forked a multiprocessing pool")

    monkeypatch.setattr(multiprocessing, "Pool", no_pool)
    result = RUNNER.invoke(app, ["eval-zeroshot", str(STORIES), "--tasks", "piqa,lambada", "--limit", "6", "--methods", "llm.int8", "-q", "--data-dir", str(DATA)])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document["tasks"]) == {"piqa", "lambada"}
    piqa = document["tasks"]["piqa"]
    assert set(piqa) == {"fp16", "llm.int8"} and 0 <= piqa["llm.int8"]["acc"] <= 1
    assert "acc" in piqa["llm.int8"]["delta"] and "perplexity" in document["tasks"]["lambada"]["fp16"]
    lambada = document["tasks"]["lambada"]["llm.int8"]
    assert set(lambada["delta_stderr"]) == {"acc"}  # a paired stderr exists for per-document means, not for perplexity
    assert lambada["perplexity_stderr"] > 0  # bootstrapped in this process
    assert set(piqa["llm.int8"]["delta_stderr"]) == {"acc", "acc_norm"}


def test_paired_delta_stderr_counts_only_changed_answers():
    baseline = {0: 1.0, 1: 1.0, 2: 0.0, 3: 0.0}
    assert zeroshot.paired_delta_stderr(baseline, dict(baseline)) == 0.0  # same answers: no doubt about the delta
    changed = {0: 1.0, 1: 0.0, 2: 1.0, 3: 0.0}  # differences 0, -1, +1, 0
    assert abs(zeroshot.paired_delta_stderr(baseline, changed) - (2 / 3) ** 0.5 / 2) < 1e-12
    assert zeroshot.paired_delta_stderr(baseline, {0: 1.0, 1: 1.0}) is None  # not the same documents


def stories_lambada_perplexity(variant: str, folder: Path):
    """perplexity(limit, batch_size, samples): one stories260K variant on local LAMBADA through zeroshot.evaluate."""
    import torch

    from llmint8_cli.core.methods import parse_methods
    from llmint8_cli.evaluation import variants

    subject = variants.subject(str(STORIES), parse_methods("llm.int8"), 6.0, torch.float32, torch.device("cpu"))
    network = dict(subject.variants)[variant]
    manager, names, _ = zeroshot.task_manager(["lambada"], str(DATA), True, folder)

    def perplexity(limit=6, batch_size=4, samples=None):
        return zeroshot.evaluate(network, subject.tokenizer, manager, names, limit, 0, batch_size, "cpu", samples=samples).results["lambada"]["perplexity"]

    return perplexity


@needs_stories
@needs_data
def test_int8_answers_do_not_depend_on_batch_size(monkeypatch, tmp_path):
    perplexity = stories_lambada_perplexity("llm.int8", tmp_path)
    one = perplexity(batch_size=1)
    assert perplexity(batch_size=6) == one
    monkeypatch.setattr(zeroshot, "sequence_wide", lambda model: False)  # lm-eval's own padded batches
    assert perplexity(batch_size=6) != one  # padding rows moved outlier columns: what the guard prevents


@needs_stories
@needs_data
def test_samples_select_documents_by_index(tmp_path):
    """The document selection that lets several processes fill one cache (bench/zeroshot_one_method.py)."""
    from llmint8_cli.evaluation.variants import BASELINE

    perplexity = stories_lambada_perplexity(BASELINE, tmp_path)
    first_six = perplexity()
    assert perplexity(None, samples={"lambada": list(range(6))}) == first_six
    assert perplexity(None, samples={"lambada": [0, 2, 4]}) != first_six


@needs_stories
@needs_data
def test_lm_eval_model_type_loads_llmint8_checkpoints(tmp_path):
    import lm_eval

    from llmint8_cli.evaluation.lm_eval_plugin import LLMInt8LM  # importing registers --model llmint8
    from llmint8_cli.checkpoint.quantize import QuantizeOptions, quantize_checkpoint

    out = tmp_path / "int8"
    quantize_checkpoint(str(STORIES), out, QuantizeOptions(calib_samples=0))
    manager, names, _ = zeroshot.task_manager(["piqa"], str(DATA), True, tmp_path)
    output = lm_eval.simple_evaluate(model="llmint8", model_args=f"path={out},device=cpu", tasks=list(names.values()), limit=4, task_manager=manager)
    assert 0 <= output["results"]["piqa_local"]["acc,none"] <= 1
    assert LLMInt8LM(path=str(out), device="cpu", batch_size=4).batch_size == 1  # no padded batches (see zeroshot.sequence_wide)


def test_unknown_task_is_a_one_line_error():
    result = RUNNER.invoke(app, ["eval-zeroshot", "any/model", "--tasks", "mmlu", "-q"])
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        "llmint8: error: unknown task mmlu; offline (or with --data-dir) choose from winogrande, hellaswag, piqa, lambada, online any lm-eval task"
    ]


@pytest.mark.slow  # 20-35 s: the default suite stays under 15 minutes; its eval-ppl twin runs there
@needs_stories
@needs_data
def test_cache_dir_resumes_without_running_the_model_again(tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    args = ["eval-zeroshot", str(STORIES), "--tasks", "piqa", "--limit", "3", "--methods", "llm.int8", "-q", "--data-dir", str(DATA), "--cache-dir", str(tmp_path)]
    first = RUNNER.invoke(app, args)
    assert first.exit_code == 0, first.stderr
    caches = json.loads(first.stdout)["caches"]
    assert caches["fp16"] != caches["llm.int8"] and all(c.endswith(".jsonl") and Path(c).is_file() for c in caches.values())
    stored = tmp_path / "stories-int8"
    assert RUNNER.invoke(app, ["quantize", str(STORIES), str(stored), "--calib-samples", "0", "-q"]).exit_code == 0
    from_folder = RUNNER.invoke(app, ["eval-zeroshot", str(stored), *args[2:]])
    assert from_folder.exit_code == 0, from_folder.stderr
    assert json.loads(from_folder.stdout)["caches"]["fp16"] == caches["fp16"]  # the 16-bit source's answers are shared

    def model_must_not_run(*_, **__):
        raise AssertionError("the cached answers were not used")

    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", model_must_not_run)
    second = RUNNER.invoke(app, args)
    assert second.exit_code == 0, second.stderr
    assert json.loads(second.stdout)["tasks"] == json.loads(first.stdout)["tasks"]
    other_threshold = RUNNER.invoke(app, [*args, "--threshold", "5"])
    assert other_threshold.exit_code == 1 and "cached answers were not used" in other_threshold.stderr


@pytest.mark.parametrize(
    ("task", "rows", "words"),
    [
        ("piqa", ['{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}', "garbage"], "piqa/validation.jsonl:2: not valid JSON"),
        ("winogrande", ['{"sentence": "_ ran", "option1": "A", "answer": "1"}'], "winogrande/validation.jsonl:1: field 'option2' is missing or not a str"),
        ("hellaswag", ["[1, 2]"], "hellaswag/validation.jsonl:1: not a JSON object"),
        ("lambada", ['{"text": null}'], "lambada_openai/test.jsonl:1: field 'text' is missing or not a str"),
        ("piqa", ['{"goal": "g", "sol1": "a", "sol2": "b", "label": 2}'], "piqa/validation.jsonl:1: field 'label' is 2, not one of 0, 1"),
        ("hellaswag", ['{"activity_label": "a", "ctx_a": "c", "ctx_b": "", "endings": ["x", "y"], "label": "3"}'],
         "hellaswag/validation.jsonl:1: field 'label' is '3', not one of 0, 1"),
        ("hellaswag", ['{"activity_label": "a", "ctx_a": "c", "ctx_b": "", "endings": ["x", ""], "label": 0}'],
         "hellaswag/validation.jsonl:1: field 'endings' needs at least two non-empty strings"),
        ("winogrande", ['{"sentence": "no blank", "option1": "A", "option2": "B", "answer": "1"}'], "winogrande/validation.jsonl:1: field 'sentence' needs exactly one '_' (where an option goes)"),
        ("winogrande", ['{"sentence": "_ ran", "option1": "A", "option2": "B", "answer": "3"}'], "winogrande/validation.jsonl:1: field 'answer' is '3', not 1 or 2"),
        ("piqa", ['{"goal": " ", "sol1": "a", "sol2": "b", "label": 0}'], "piqa/validation.jsonl:1: field 'goal' is empty"),
        ("lambada", ['{"text": "word"}'], "lambada_openai/test.jsonl:1: field 'text' needs at least two words (the last one is the target)"),
        ("piqa", [], "piqa/validation.jsonl: no rows"),
    ],
)
def test_a_bad_task_row_is_a_one_line_error_naming_file_and_row(tmp_path, task, rows, words):
    """Checked before any model loads: lm-eval would fail inside `datasets`, naming neither."""
    path = tmp_path / zeroshot.TASKS[task].local_file
    path.parent.mkdir(parents=True)
    path.write_text("".join(row + "\n" for row in rows))
    result = RUNNER.invoke(app, ["eval-zeroshot", "unused/model", "--tasks", task, "--data-dir", str(tmp_path), "-q"])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"llmint8: error: {tmp_path.resolve()}/{words}"]


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_an_out_of_range_limit_is_one_line(limit):
    result = RUNNER.invoke(app, ["eval-zeroshot", "unused/model", "--tasks", "piqa", "--limit", limit, "-q"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "llmint8: error: Invalid value for '--limit': Input should be greater than or equal to 1 (see 'llmint8 eval-zeroshot --help')"
    ]
