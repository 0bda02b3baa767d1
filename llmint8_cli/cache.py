"""Where llmint8 keeps what it computes once per machine: the CPU GEMM choice, Inductor's compiled
code, expanded GGUF files. LLMINT8_CACHE_DIR moves it; else XDG_CACHE_HOME or ~/.cache, /llmint8."""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Iterator
from pathlib import Path

_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("llmint8_cache_quiet", default=False)


def root() -> Path:
    return Path(os.environ.get("LLMINT8_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llmint8"))


def note(message: str) -> None:
    """A line on stderr about work done once (a build, a file kept in the cache): a minute of silence
    would look like a hang, and half a gigabyte appearing unannounced like a leak. Not under --quiet."""
    if not _QUIET.get():
        print(f"llmint8: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet(on: bool) -> Iterator[None]:
    token = _QUIET.set(on)
    try:
        yield
    finally:
        _QUIET.reset(token)
