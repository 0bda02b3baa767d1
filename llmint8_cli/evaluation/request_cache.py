"""lm-eval's request cache kept as JSON lines: answers stored as data, which cannot carry code.

lm-eval's own cache (`use_cache`) is a SqliteDict whose values it unpickles, so a crafted `.db`
runs code on the next run; llmint8 never opens one. Each line here is one answer,
`{"kind": ..., "key": ..., "answer": ...}`, keyed as lm-eval keys its cache (`hash_args` of the
request), appended as soon as the model gives it, so that a stopped run resumes. Every line read
back is checked against its kind's domain: a log-likelihood is a finite number <= 0 and its
greedy flag a boolean, a generation a string; anything else is a one-line error naming the line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

from llmint8_cli import distributed
from llmint8_cli.data import append_jsonl, read_appended_jsonl
from llmint8_cli.errors import DataError

SUFFIX = ".jsonl"
LEGACY_SUFFIX = "_rank0.db"  # lm-eval's pickled cache, written by llmint8 before 2026-12-06: never read
KEY = re.compile(r"[0-9a-f]{64}")


def _log_probability(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value <= 0


ANSWER_CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "loglikelihood": (lambda a: isinstance(a, list) and len(a) == 2 and _log_probability(a[0]) and isinstance(a[1], bool),
                      "[log-probability <= 0, is-greedy boolean]"),
    "loglikelihood_rolling": (_log_probability, "a finite log-probability <= 0"),
    "generate_until": (lambda a: isinstance(a, str), "a string"),
}


def as_stored(answer):
    """An answer as JSON holds it (lm-eval's (logprob, greedy) tuple becomes a list)."""
    return list(answer) if isinstance(answer, tuple) else answer


def check_line(path: Path, number: int, entry) -> tuple[str, object]:
    """(key, answer) of one cache line, or a DataError naming the line and what is wrong."""
    if not (isinstance(entry, dict) and entry.get("kind") in ANSWER_CHECKS and isinstance(entry.get("key"), str) and KEY.fullmatch(entry["key"])):
        raise DataError(f"{path}:{number}: not a request-cache line (needs kind, a 64-digit key and answer)")
    check, domain = ANSWER_CHECKS[entry["kind"]]
    if not check(entry.get("answer")):
        raise DataError(f"{path}:{number}: a {entry['kind']} answer must be {domain}, got {entry.get('answer')!r:.80}")
    return entry["key"], entry["answer"]


class RequestCache:
    """The answers of one model (one variant folder) to lm-eval requests, one JSON line each.

    Under torchrun each process appends to its own file (distributed.own_file) and every process
    starts from all the answers, read once by rank 0 before any process writes."""

    def __init__(self, path: Path):
        shared = Path(path)
        self.path = distributed.own_file(shared)
        self.answers = distributed.from_main(lambda: self._read(distributed.every_file(shared)), "reading the request cache")

    @staticmethod
    def _read(files: list[Path]) -> dict[str, object]:
        return {key: answer for path in files for key, answer in (check_line(path, number, entry) for number, entry in read_appended_jsonl(path))}

    @staticmethod
    def key(kind: str, args) -> str:
        from lm_eval.api.model import hash_args

        return hash_args(kind, args)

    def get(self, kind: str, args):
        answer = self.answers.get(self.key(kind, args))
        return tuple(answer) if kind == "loglikelihood" and answer is not None else answer

    def add(self, kind: str, args, answer) -> None:
        entry = {"kind": kind, "key": self.key(kind, args), "answer": as_stored(answer)}
        check_line(self.path, len(self.answers) + 1, entry)  # never write what could not be read back
        append_jsonl(self.path, [entry])
        self.answers[entry["key"]] = entry["answer"]


def legacy_caches(folder: Path) -> list[Path]:
    """Pickled lm-eval caches of earlier llmint8 versions in a variant folder: left alone, unread."""
    return sorted(folder.glob(f"*{LEGACY_SUFFIX}"))
