"""Zero-shot tasks through lm-evaluation-harness, on model objects (HFLM + simple_evaluate).

Online, lm-eval's own tasks run as they are. Offline (or with --data-dir), the task configs in
configs/lm_eval/ are used: each includes lm-eval's built-in YAML and only points its dataset at
a local JSON Lines file (layout of shared/data/README.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from unittest import mock

from llmint8_cli import data, models
from llmint8_cli.errors import DataError, InvalidArgumentError
from llmint8_cli.evaluation import request_cache
from llmint8_cli.evaluation.request_cache import RequestCache


@dataclass(frozen=True)
class TaskSpec:
    builtin: str  # lm-eval's task name
    local_file: str  # relative to the data folder
    fields: dict[str, type | tuple[type, ...]]  # what lm-eval's task reads from each row
    problem: Callable[[dict], str | None]  # what is wrong with a row whose fields have those types (None: nothing)
    required: tuple[str, ...] = ()  # string fields that may not be empty


def _label_in(row: dict, field: str, count: int) -> str | None:
    value = row[field]
    if isinstance(value, bool) or str(value).strip() not in {str(i) for i in range(count)}:
        return f"field {field!r} is {value!r}, not one of {', '.join(map(str, range(count)))}"
    return None


def _winogrande(row: dict) -> str | None:
    if row["sentence"].count("_") != 1:
        return "field 'sentence' needs exactly one '_' (where an option goes)"
    return None if row["answer"] in ("1", "2") else f"field 'answer' is {row['answer']!r}, not 1 or 2"


def _hellaswag(row: dict) -> str | None:
    endings = row["endings"]
    if len(endings) < 2 or not all(isinstance(e, str) and e.strip() for e in endings):
        return "field 'endings' needs at least two non-empty strings"
    return _label_in(row, "label", len(endings))


def _lambada(row: dict) -> str | None:
    return None if " " in row["text"].strip() else "field 'text' needs at least two words (the last one is the target)"


TASKS = {
    "winogrande": TaskSpec("winogrande", "winogrande/validation.jsonl", {"sentence": str, "option1": str, "option2": str, "answer": str},
                           _winogrande, ("sentence", "option1", "option2")),
    "hellaswag": TaskSpec(
        "hellaswag", "hellaswag/validation.jsonl", {"activity_label": str, "ctx_a": str, "ctx_b": str, "endings": list, "label": (str, int)},
        _hellaswag, ("ctx_a",),
    ),
    "piqa": TaskSpec("piqa", "piqa/validation.jsonl", {"goal": str, "sol1": str, "sol2": str, "label": int}, lambda row: _label_in(row, "label", 2),
                     ("goal", "sol1", "sol2")),
    "lambada": TaskSpec("lambada_openai", "lambada_openai/test.jsonl", {"text": str}, _lambada, ("text",)),
}


def parse_tasks(text: str, local: bool) -> list[str]:
    """Task names; with local data only the four whose files we know (configs/lm_eval), online any lm-eval task."""
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [n for n in names if n not in TASKS] if local else []
    if not names or unknown:
        raise InvalidArgumentError(
            f"unknown task {', '.join(unknown) or '(none given)'}; offline (or with --data-dir) choose from {', '.join(TASKS)}, online any lm-eval task"
        )
    return names


def builtin_name(name: str) -> str:
    return TASKS[name].builtin if name in TASKS else name


def local_data_dir(names: list[str], data_dir) -> Path:
    """The data folder holding every requested task's file, or a one-line error naming what is missing."""
    for base in data.data_dirs(data_dir):
        if all((base / TASKS[n].local_file).is_file() for n in names):
            return base
    missing = ", ".join(TASKS[n].local_file for n in names)
    raise DataError(f"task data not found locally and the Hub is not used: supply {missing} under --data-dir (or $LLMINT8_DATA_DIR)")


def check_task_file(path: Path, spec: TaskSpec) -> None:
    """Every row a JSON object with the fields the task reads, each within its domain (a label
    that names an answer, no empty text), else a DataError naming file and row.

    lm-eval would otherwise fail deep inside `datasets` or a task's Python, naming neither, or
    score an impossible label as a wrong answer.
    """
    rows = data.read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    for number, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: not a JSON object")
        for field, kind in spec.fields.items():
            if not isinstance(row.get(field), kind):
                names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
                raise DataError(f"{path}:{number}: field {field!r} is missing or not a {names}")
        empty = next((field for field in spec.required if not row[field].strip()), None)
        problem = f"field {empty!r} is empty" if empty else spec.problem(row)
        if problem:
            raise DataError(f"{path}:{number}: {problem}")


def write_local_configs(names: list[str], data_dir, folder: Path) -> Path:
    """Ready task YAMLs `<builtin>_local` in `folder` (a temporary one of the caller's): the
    templates of configs/lm_eval with lm-eval's task folder and a checked copy of each local data
    file filled in; returns the data folder they read.

    No path reaches lm-eval as text it parses: the YAML is written by a dumper (a folder name with a
    newline, a quote or `!function` stays a string), and `datasets`, which reads a data file's name
    as a glob pattern or a URL, gets the copy in `folder`, whose name we chose. Its Arrow cache
    goes there too, so a run leaves nothing behind.
    """
    import lm_eval.tasks
    import yaml

    base = local_data_dir(names, data_dir).resolve()
    builtin_dir = Path(lm_eval.tasks.__file__).parent
    templates = resources.files("llmint8_cli.configs") / "lm_eval"
    for name in names:
        spec = TASKS[name]
        check_task_file(base / spec.local_file, spec)
        copy = folder / "data" / spec.local_file
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(base / spec.local_file, copy)
        config = yaml.safe_load((templates / f"{spec.builtin}_local.yaml").read_text())
        config["include"] = str(builtin_dir / config["include"])
        config["dataset_kwargs"]["data_files"] = {split: str(copy) for split in config["dataset_kwargs"]["data_files"]}
        config["dataset_kwargs"]["cache_dir"] = str(folder / "datasets")
        (folder / f"{spec.builtin}_local.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return base


def data_digest(folder: Path, task_names: dict[str, str], limit, num_fewshot: int) -> str:
    """The documents a run evaluates: the task names, the limit and shots, and the copied local
    files' contents (write_local_configs; none for the Hub's tasks)."""
    digest = hashlib.sha256(json.dumps([task_names, limit, num_fewshot]).encode())
    for path in sorted((folder / "data").rglob("*.jsonl")) if (folder / "data").is_dir() else []:
        digest.update(path.relative_to(folder).as_posix().encode())
        with path.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:16]


PATTERN_CHARACTERS = ("*", "?", "[", "]", "::", "://")  # what `datasets` reads as a glob or a URL in a data file's name


@contextlib.contextmanager
def task_configs():
    """A temporary folder for the local task YAMLs, removed when the run ends (Ctrl-C and SIGTERM too)."""
    with tempfile.TemporaryDirectory(prefix="llmint8-tasks-") as folder:
        if any(part in folder for part in PATTERN_CHARACTERS):
            raise InvalidArgumentError(f"the temporary folder {folder!r} holds one of {' '.join(PATTERN_CHARACTERS)}, which `datasets` reads as a pattern; "
                                       "set TMPDIR to a plain path")
        yield Path(folder)


def task_manager(names: list[str], data_dir, use_local: bool, folder: Path):
    """(lm-eval TaskManager, {our name: lm-eval task name}, description of the data); local YAMLs go to `folder`."""
    from lm_eval.tasks import TaskManager

    if not use_local:
        return TaskManager(), {n: builtin_name(n) for n in names}, "lm-eval built-in tasks (Hugging Face Hub)"
    base = write_local_configs(names, data_dir, folder)
    return TaskManager(include_path=str(folder)), {n: f"{TASKS[n].builtin}_local" for n in names}, f"local files under {base}"


def use_local_tasks(data_dir) -> bool:
    return data_dir is not None or not models.hub_online()


def sequence_wide(model) -> bool:
    """Whether the model has int8 layers that look at a whole sequence, so it must not see padding.

    lm-eval pads a batch's shorter requests on the right and passes no attention mask. Causal
    attention hides the padding from the real tokens, but a layer that picks outlier columns or a
    tensor scale over the whole sequence would count the padding rows, and the answers would depend
    on --batch-size and on which requests share a batch (LAMBADA, SmolLM2, 300 requests, llm.int8:
    accuracy 30.33 % one request at a time, 29.33 % in batches of 32).
    """
    from llmint8_cli.nn.linear import Int8Linear

    return any(isinstance(m, Int8Linear) and m.method.sequence_wide for m in model.modules())


@dataclass(frozen=True)
class Evaluation:
    results: dict  # {our task name: {metric: value, metric_stderr: value}}
    batch_size: int  # requests per forward pass actually used
    cache: str | None  # the JSON-lines request cache (request_cache.py)
    per_document: dict  # {our task name: {metric: {doc_id: value}}}, metrics that lm-eval averages


def paired_delta_stderr(baseline: dict[int, float], other: dict[int, float]) -> float | None:
    """Standard error of mean(other) - mean(baseline) over the same documents.

    Both models answer the same documents, so the error of their difference comes from the
    documents whose answer changed; it is usually far smaller than either model's own stderr, and it is
    the figure that says whether a delta is more than noise. None when the documents differ.
    """
    if baseline.keys() != other.keys() or len(baseline) < 2:
        return None
    return statistics.stdev(other[doc] - baseline[doc] for doc in sorted(baseline)) / math.sqrt(len(baseline))  # document order: one figure however many processes gathered them


def evaluate(model, tokenizer, manager, task_names: dict[str, str], limit: int | None, num_fewshot: int, batch_size: int, device: str,
             cache_folder: Path | None = None, samples: dict[str, list[int]] | None = None) -> Evaluation | None:
    """One model through lm-eval; its answers are kept in `cache_folder` so that a stopped run resumes.
    Under torchrun lm-eval shares the documents out between the processes and only rank 0 gets
    the Evaluation (None elsewhere).

    `samples` ({our task name: document indices}) restricts the run to those documents, so that
    several processes can fill one cache side by side.

    Sequence-wide models run one request per forward pass; their answers are kept under their own
    name ("lm-eval-unpadded"), so that answers from padded batches (written by earlier versions) are
    never read back.
    """
    from lm_eval import simple_evaluate

    from llmint8_cli.evaluation.lm_eval_plugin import UnpaddedHFLM

    cache = None
    if cache_folder is not None:
        cache = RequestCache(cache_folder / (("lm-eval-unpadded" if sequence_wide(model) else "lm-eval") + request_cache.SUFFIX))
    lm = UnpaddedHFLM(model, request_cache=cache, tokenizer=tokenizer, batch_size=batch_size, device=device)
    # lm-eval records the git commit of the working directory by running git, which writes
    # "fatal: not a git repository" past any redirection outside a repository; it is not ours to record.
    # Its bootstrap stderr (LAMBADA's perplexity) forks a multiprocessing pool from this process,
    # whose torch threads make a forked worker die now and then and the pool wait for it forever;
    # DISABLE_MULTIPROC draws the same seeded resamples in this process (0.6 s for 1000 of 5,153).
    with mock.patch("lm_eval.evaluator.get_git_commit_hash", lambda: None), mock.patch.dict(os.environ, {"DISABLE_MULTIPROC": "1"}):
        output = simple_evaluate(
            model=lm, tasks=list(task_names.values()), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            log_samples=True, verbosity="ERROR", bootstrap_iters=1000,
            samples=None if samples is None else {task_names[ours]: indices for ours, indices in samples.items()},
        )
    if output is None:  # a process other than rank 0
        return None
    results, per_document = {}, {}
    for ours, theirs in task_names.items():
        averaged = [m["metric"] for m in output["configs"][theirs]["metric_list"] if m.get("aggregation") == "mean"]
        per_document[ours] = {metric: {s["doc_id"]: float(s[metric]) for s in output["samples"][theirs]} for metric in averaged}
        raw = output["results"][theirs]
        metrics = {}
        for key, value in raw.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, _ = key.split(",", 1)
            metrics[metric] = None if isinstance(value, float) and math.isnan(value) else round(float(value), 6)
        results[ours] = metrics
    return Evaluation(results, lm.batch_size, None if cache is None else str(cache.path), per_document)
