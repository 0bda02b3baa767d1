"""llmint8_manifest.json: the size and sha256 of every file of an llmint8 folder.

It is what makes a folder ours. Loaders verify against it (every file the folder holds is listed
and matches, so nothing a loader reads escapes the check), and `--force` replaces a folder only
where every entry in it is a file the manifest lists, unchanged, so a user's own files are never
deleted. Every name in it is checked to be a plain file name inside the folder before any file is
read.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import stat
from pathlib import Path

from llmint8_cli.checkpoint.writer import sha256_file
from llmint8_cli.errors import CheckpointError

MANIFEST = "llmint8_manifest.json"
PARTIAL_MARKER = ".llmint8-partial"  # present while a folder is being written; never in the manifest
SET_ASIDE_MARKER = ".llmint8-set-aside"  # in an earlier output moved aside while its replacement takes its place
MANIFEST_VERSION = 1
SHA256 = re.compile(r"[0-9a-f]{64}")
NO_VERIFY_ENV = "LLMINT8_NO_VERIFY"  # from_pretrained's escape: it takes no llmint8 argument
NO_VERIFY_HINT = f"--no-verify, verify_files=False or {NO_VERIFY_ENV}=1 skip the check"


_VERIFYING = contextvars.ContextVar("llmint8_verifying", default=True)


@contextlib.contextmanager
def verifying(enabled: bool):
    """Whether loads inside the block check the manifest (`load(..., verify_files=False)`)."""
    token = _VERIFYING.set(enabled)
    try:
        yield
    finally:
        _VERIFYING.reset(token)


def verification_wanted() -> bool:
    """False inside `verifying(False)` or with LLMINT8_NO_VERIFY=1 (from_pretrained takes no llmint8 argument)."""
    return _VERIFYING.get() and os.environ.get(NO_VERIFY_ENV, "0").lower() in ("0", "", "false", "no")


def write_manifest(folder, hashes: dict[str, str] | None = None, names: set[str] | None = None) -> None:
    """List every file of `folder` (or only `names`); hashes already computed while writing are reused.

    Public as `llmint8_cli.write_manifest`: after saving a tokenizer beside a model that
    `save_pretrained` wrote, this lists the folder again so that loaders accept it.
    """
    folder, hashes = Path(folder), hashes or {}
    files = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name not in (MANIFEST, PARTIAL_MARKER) and (names is None or p.name in names)):
        files[path.name] = {"size": path.stat().st_size, "sha256": hashes.get(path.name) or sha256_file(path)}
    (folder / MANIFEST).write_text(json.dumps({"format_version": MANIFEST_VERSION, "files": files}, indent=1) + "\n")


def is_plain_name(name) -> bool:
    """A file name that stays inside the folder: no separator, no `..`, not absolute."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def read_manifest(folder: Path) -> dict[str, dict]:
    """{file name: {"size", "sha256"}}, every field checked; a malformed manifest is a CheckpointError."""
    path = folder / MANIFEST
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {MANIFEST}, so its files cannot be verified ({NO_VERIFY_HINT})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({getattr(exc, 'msg', None) or getattr(exc, 'strerror', None) or exc})") from None
    if not isinstance(document, dict) or document.get("format_version") != MANIFEST_VERSION or not isinstance(document.get("files"), dict):
        raise CheckpointError(f"{path}: not an llmint8 manifest (needs format_version {MANIFEST_VERSION} and a \"files\" object)")
    files = document["files"]
    for name, entry in files.items():
        if not is_plain_name(name):
            raise CheckpointError(f"{path}: entry {name!r} is not a file name inside the folder")
        if not (isinstance(entry, dict) and type(entry.get("size")) is int and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str) and SHA256.fullmatch(entry["sha256"])):
            raise CheckpointError(f"{path}: entry {name!r} needs a non-negative integer size and a 64-digit lowercase sha256")
    return files


def matches(path: Path, entry: dict) -> bool:
    return path.stat().st_size == entry["size"] and sha256_file(path) == entry["sha256"]


def verify(folder: Path) -> None:
    """Refuse a folder unless every file in it is listed and every listed file is there, unchanged."""
    files = read_manifest(folder)
    if "config.json" not in files:
        raise CheckpointError(f"{folder / MANIFEST}: lists no config.json; the manifest must cover every file a loader reads")
    for path in sorted(folder.iterdir()):
        if path.name != MANIFEST and path.is_file() and path.name not in files:
            raise CheckpointError(f"{path}: not listed in {MANIFEST} (added after the folder was written?); {NO_VERIFY_HINT}")
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing")
        if not matches(path, entry):
            raise CheckpointError(f"{path}: size or sha256 does not match the manifest (corrupted or modified); {NO_VERIFY_HINT}")


def foreign_entry(folder: Path, ignored: tuple[str, ...] = ()) -> str | None:
    """The first entry of `folder` (but `ignored` names) that is not a file its manifest lists
    unchanged (None: all ours, or the folder is empty), with why: `--force` may remove a folder
    only when this is None."""
    entries = sorted((p for p in folder.iterdir() if p.name not in ignored), key=lambda path: (path.name == MANIFEST, path.name))  # a user's own entry named first
    if not entries:
        return None
    try:
        files = read_manifest(folder)
    except CheckpointError:
        files = None
    for path in entries:
        if path.name == MANIFEST and files is not None:
            continue
        if files is None:
            return f"{path} (not an llmint8 manifest)" if path.name == MANIFEST else f"{path} (the folder has no valid {MANIFEST})"
        mode = path.lstat().st_mode
        if not stat.S_ISREG(mode):
            return f"{path} (not a plain file)"
        if path.name not in files:
            return f"{path} (not listed in {MANIFEST})"
        if not matches(path, files[path.name]):
            return f"{path} (changed since it was written)"
    return None
