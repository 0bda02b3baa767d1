"""Convert the pickled lm-eval caches of llmint8 before 2026-12-06 (`*_rank0.db`) to JSON lines.

    python bench/convert_request_caches.py FOLDER [--delete]

Each `<prefix>_rank0.db` under FOLDER becomes `<prefix>.jsonl` beside it (request_cache.py's
format, the same keys), which `llmint8 eval-zeroshot --cache-dir` reads. The pickles are read by
an unpickler that resolves no global at all, so a crafted one cannot run code: it fails here,
naming the file and key, and nothing is written for that file. Every answer must then be an
lm-eval answer (a (log-probability, greedy) pair, a log-probability or a string) and pass the
same domain checks as a cache line. `--delete` removes each .db once its .jsonl is written.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import sqlite3
import sys
from pathlib import Path

from llmint8_cli.errors import DataError
from llmint8_cli.evaluation.request_cache import LEGACY_SUFFIX, SUFFIX, as_stored, check_line


class DataOnlyUnpickler(pickle.Unpickler):
    """Numbers, strings, booleans, tuples and lists only: no class or function is ever looked up."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id")


def answer_kind(answer) -> str:
    if isinstance(answer, tuple) and len(answer) == 2:
        return "loglikelihood"
    if isinstance(answer, float):
        return "loglikelihood_rolling"
    return "generate_until"


def convert(db: Path) -> Path:
    """Write db's answers as JSON lines beside it; returns the new file (nothing written on any error)."""
    target = db.with_name(db.name.removesuffix(LEGACY_SUFFIX) + SUFFIX)
    if target.exists():
        raise DataError(f"{target} exists already; remove it first")
    lines = []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        for number, (key, blob) in enumerate(connection.execute("SELECT key, value FROM unnamed ORDER BY rowid"), 1):
            try:
                answer = DataOnlyUnpickler(io.BytesIO(bytes(blob))).load()
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
                raise DataError(f"{db}: key {key}: not a plain lm-eval answer ({exc})") from None
            entry = {"kind": answer_kind(answer), "key": key, "answer": as_stored(answer)}
            check_line(db, number, entry)
            lines.append(json.dumps(entry) + "\n")
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_text("".join(lines), encoding="utf-8")
    temporary.rename(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--delete", action="store_true", help="remove each .db once converted")
    options = parser.parse_args()
    for db in sorted(options.folder.rglob(f"*{LEGACY_SUFFIX}")):
        try:
            target = convert(db)
        except DataError as exc:
            print(f"convert_request_caches: error: {exc}", file=sys.stderr)
            sys.exit(2)
        print(f"{db} -> {target.name} ({sum(1 for _ in target.open())} answers)")
        if options.delete:
            db.unlink()


if __name__ == "__main__":
    main()
