"""Evaluation texts: local copies first (the layout of shared/data/README.md), else the Hub.

Conventions (as in GPTQ and the HF perplexity guide):
* wikitext2: WikiText-2 raw test, HF rows joined with blank lines ("\\n\\n".join(rows)).
* ptb: Penn Treebank test (Mikolov), sentences joined with single spaces.
* c4: C4 English validation, the first 1,100 documents of shard 0 joined with spaces. Offline,
  a local subset stands in and every result says it is a sample.
* PATH: a .jsonl file (its "text" fields joined with blank lines) or any text file read as is.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from llmint8_cli.errors import DataError

DATA_DIR_ENV = "LLMINT8_DATA_DIR"
C4_DOCUMENTS = 1100


@dataclass(frozen=True)
class Text:
    name: str
    text: str
    source: str  # file path or Hub dataset id
    sample: bool = False  # True when the text is only a stand-in for the named dataset
    note: str = ""


def data_dirs(explicit: str | os.PathLike | None = None) -> list[Path]:
    """Where local data is looked for, in order: --data-dir, $LLMINT8_DATA_DIR, shared/data nearby."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise DataError(f"--data-dir {path}: no such folder")
        return [path]
    found = [Path(os.environ[DATA_DIR_ENV]).expanduser()] if os.environ.get(DATA_DIR_ENV) else []
    repo = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), Path.cwd().parent, repo, repo.parent):
        found.append(base / "shared" / "data")
    return [p for p in dict.fromkeys(found) if p.is_dir()]


def _local(relative: str, data_dir) -> Path | None:
    for base in data_dirs(data_dir):
        if (base / relative).is_file():
            return base / relative
    return None


MAX_TEXT_BYTES = 1 << 30  # an evaluation or calibration text; past this, tokenizers abort the process


def checked_size(path: Path) -> None:
    """A text file llmint8 reads whole must be a readable file of at most MAX_TEXT_BYTES."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if size > MAX_TEXT_BYTES:
        raise DataError(f"{path}: {size / 2**30:.1f} GiB, more text than llmint8 reads (1 GiB); cut the file (--max-tokens uses only its start)")


def read_text(path: Path) -> str:
    """A whole UTF-8 text file (size, readability, encoding and NUL bytes checked: a binary file is
    one line naming it, never a tokenizer that aborts the process)."""
    checked_size(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if "\0" in text:
        raise DataError(f"{path}: holds NUL bytes, so it is not a text file")
    return text


def read_jsonl(path: Path, limit: int | None = None) -> list[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line; a bad line is a DataError naming it."""
    checked_size(path)
    rows = []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((number, json.loads(line)))
                except (json.JSONDecodeError, RecursionError):
                    raise DataError(f"{path}:{number}: not valid JSON") from None
                if limit is not None and len(rows) >= limit:
                    break
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    return rows


def _own_file(path: Path, flags: int) -> int:
    """A descriptor of a file llmint8 appends to (a cache): opened without following a symbolic
    link, and only a regular file with no other hard link, so that writing it never reaches a
    user's file under another name. Anything else is a DataError naming the path."""
    try:
        descriptor = os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        why = "a symbolic link; cache files are llmint8's own, never a link to another file" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
        raise DataError(f"{path}: cannot use it as a cache file: {why}") from None
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1:
        os.close(descriptor)
        why = "not a regular file" if not stat.S_ISREG(status.st_mode) else "it has other hard links, so writing it would change another file"
        raise DataError(f"{path}: cannot use it as a cache file: {why}; remove it")
    return descriptor


def read_appended_jsonl(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed value) of each line of a file that is appended to line by line (a
    cache): a last line cut short by a killed writer (or a full disk) is cut from the file, so that
    later appends stay whole; any other bad line is a DataError naming it. A missing file has no
    lines; a link or anything else not made by append_jsonl is refused (_own_file)."""
    if not os.path.lexists(path):
        return []
    descriptor = _own_file(path, os.O_RDWR)
    try:
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            raw = handle.read()
        whole = raw[: raw.rfind(b"\n") + 1]
        if len(whole) != len(raw):
            os.ftruncate(descriptor, len(whole))
        text = whole.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the cache file: {exc.strerror or exc}") from None
    finally:
        os.close(descriptor)
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            rows.append((number, json.loads(line)))
        except (json.JSONDecodeError, RecursionError):
            raise DataError(f"{path}:{number}: not valid JSON") from None
    return rows


def append_jsonl(path: Path, entries: list) -> None:
    """Append one JSON line per entry to a cache file (created if missing; see _own_file); a full
    disk or a read-only folder is a DataError naming the file."""
    descriptor = _own_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        with os.fdopen(descriptor, "a", encoding="utf-8", closefd=False) as handle:
            handle.writelines(json.dumps(entry) + "\n" for entry in entries)
    except OSError as exc:
        raise DataError(f"{path}: cannot write the cache file: {exc.strerror or exc}") from None
    finally:
        os.close(descriptor)


def text_fields(path: Path, limit: int | None = None) -> list[str]:
    """The string field "text" of every row, or a DataError naming the first row without one."""
    texts = []
    for number, row in read_jsonl(path, limit):
        if not (isinstance(row, dict) and isinstance(row.get("text"), str)):
            raise DataError(f"{path}:{number}: every JSON line needs a string field 'text'")
        texts.append(row["text"])
    return texts


def _hub(path: str, name: str | None, split: str, field: str, what: str, local_hint: str, **kwargs) -> list[str]:
    from llmint8_cli.models import hub_online

    try:
        if not hub_online():
            raise ConnectionError("the Hub is unreachable")
        import datasets

        return list(datasets.load_dataset(path, name, split=split, **kwargs)[field])
    except Exception as exc:
        raise DataError(
            f"{what} is not available locally and the Hub failed ({exc if isinstance(exc, ConnectionError) else type(exc).__name__}); "
            f"supply the file {local_hint} under --data-dir (or ${DATA_DIR_ENV})"
        ) from None


def wikitext2(data_dir=None) -> Text:
    relative = "wikitext-2-raw/wiki.test.raw"
    path = _local(relative, data_dir)
    if path is not None:
        raw = read_text(path)
        rows = [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]
        return Text("wikitext2", "\n\n".join(rows), str(path))
    rows = _hub("wikitext", "wikitext-2-raw-v1", "test", "text", "WikiText-2", relative)
    return Text("wikitext2", "\n\n".join(rows), "hf:wikitext/wikitext-2-raw-v1:test")


def ptb(data_dir=None) -> Text:
    relative = "ptb/ptb.test.txt"
    path = _local(relative, data_dir)
    if path is not None:
        sentences = [line.strip() for line in read_text(path).splitlines()]
        return Text("ptb", " ".join(sentences), str(path))
    sentences = _hub("ptb_text_only", "penn_treebank", "test", "sentence", "PTB", relative)
    return Text("ptb", " ".join(sentences), "hf:ptb_text_only:test")


def c4(data_dir=None) -> Text:
    for relative in ("c4/c4-validation.00000-of-00008.jsonl", "c4/c4-validation-subset-2k.jsonl", "c4/c4-sample.jsonl"):
        path = _local(relative, data_dir)
        if path is not None:
            docs = text_fields(path, C4_DOCUMENTS)
            sample = "00000-of-00008" not in relative
            note = "local C4 sample, not the official validation shard: numbers are not comparable to published C4 perplexities" if sample else ""
            return Text("c4", " ".join(docs), str(path), sample=sample, note=note)
    docs = _hub(
        "allenai/c4", None, "validation", "text", "C4", "c4/c4-validation.00000-of-00008.jsonl",
        data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
    )
    return Text("c4", " ".join(docs[:C4_DOCUMENTS]), "hf:allenai/c4:en/validation.00000")


def from_path(path: Path) -> Text:
    return Text(path.name, "\n\n".join(text_fields(path)) if path.suffix == ".jsonl" else read_text(path), str(path))


DATASETS = {"wikitext2": wikitext2, "ptb": ptb, "c4": c4}


def load_text(dataset: str, data_dir=None) -> Text:
    """The evaluation text for a dataset name or a local file path; never empty."""
    if dataset in DATASETS:
        text = DATASETS[dataset](data_dir)
    else:
        path = Path(dataset).expanduser()
        if path.is_dir():
            raise DataError(f"{path}: a folder; --dataset takes a .txt/.jsonl file or one of {', '.join(DATASETS)}")
        if not path.is_file():
            if path.suffix or len(path.parts) > 1:
                raise DataError(f"{path}: no such file")
            raise DataError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)} or a path to a .txt/.jsonl file")
        text = from_path(path)
    if not text.text.strip():
        raise DataError(f"{text.source}: the text is empty")
    return text


def calibration_text(dataset: str, data_dir=None) -> Text:
    """Calibration text: "wikitext2-train" (the default) falls back to C4 where train is missing.

    Calibration only decides which columns are stored in 16-bit; the WikiText-2 test split is
    never used for it, so perplexity on that split stays a held-out measurement.
    """
    if dataset != "wikitext2-train":
        return load_text(dataset, data_dir)
    path = _local("wikitext-2-raw/wiki.train.raw", data_dir)
    if path is not None:
        return Text("wikitext2-train", read_text(path), str(path))
    try:
        rows = _hub("wikitext", "wikitext-2-raw-v1", "train", "text", "WikiText-2 train", "wikitext-2-raw/wiki.train.raw")
        return Text("wikitext2-train", "\n\n".join(rows), "hf:wikitext/wikitext-2-raw-v1:train")
    except DataError:
        fallback = c4(data_dir)
        return Text(fallback.name, fallback.text, fallback.source, True, "wikitext2-train unavailable offline; calibrated on C4 instead")
