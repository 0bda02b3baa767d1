"""Evaluations larger than one process: torch.distributed, as torchrun starts it.

`torchrun --nproc-per-node N -m llmint8_cli eval-ppl ...` (and --nnodes/--rdzv-endpoint for
several machines) gives every process RANK and WORLD_SIZE. Each one loads the model, takes its
share of the work, and rank 0 gathers the results and alone writes the table and the JSON. gloo
on the CPU, NCCL on GPUs (each process on its LOCAL_RANK's GPU). Every collective has a timeout
(LLMINT8_DIST_TIMEOUT seconds, default 600), so a rank that dies ends the others with one line
and a non-zero exit instead of a hang.
"""

from __future__ import annotations

import datetime
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from llmint8_cli.errors import LLMInt8Error

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 600


class RankFailedError(LLMInt8Error):
    """A collective did not complete: another process of the run ended or stopped answering."""


def _count(name: str, default: int, least: int) -> int:
    """An integer that torchrun sets in the environment, or a one-line error naming the variable."""
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        value = least - 1
    if value < least:
        raise LLMInt8Error(f"{name} must be an integer of at least {least} (torchrun sets it), got {raw!r:.40}")
    return value


def world_size() -> int:
    return _count("WORLD_SIZE", 1, 1)


def rank() -> int:
    return _count("RANK", 0, 0)


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return world_size() > 1 and torch.distributed.is_available()


def timeout() -> datetime.timedelta:
    raw = os.environ.get("LLMINT8_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < 10**9:  # NaN and infinity too: timedelta cannot hold them
        raise LLMInt8Error(f"LLMINT8_DIST_TIMEOUT must be a number of seconds above 0, got {raw!r:.40}")
    return datetime.timedelta(seconds=seconds)


def start(device: torch.device) -> None:
    """Join the run's process group (once); NCCL where this process computes on a GPU."""
    if not active() or torch.distributed.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if rank() >= world_size():
        raise LLMInt8Error(f"RANK {rank()} is not below WORLD_SIZE {world_size()}: start a multi-process run with torchrun")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "RANK") if name not in os.environ]
    if missing:
        raise LLMInt8Error(f"WORLD_SIZE={world_size()} but {', '.join(missing)} unset: start a multi-process run with torchrun (torchrun --nproc-per-node N -m llmint8_cli ...)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    collective(lambda: torch.distributed.init_process_group(backend, timeout=timeout()), "joining the run")


def device_of_rank(device: torch.device) -> torch.device:
    """A GPU run puts each process on its own GPU (LOCAL_RANK); the CPU stays the CPU."""
    if active() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def collective(call: Callable[[], T], what: str) -> T:
    """A collective call, its failure (a timeout, a closed peer) as one line."""
    try:
        return call()
    except (RuntimeError, ConnectionError) as exc:  # gloo, NCCL and the rendezvous store raise these when a peer is gone
        said = re.sub(r"^\[[^\]]*\]\s*", "", (str(exc).splitlines() or [type(exc).__name__])[0]).split(". ")[0][:160]
        raise RankFailedError(f"rank {rank()} of {world_size()}: {what} failed: another process of the run ended or did not answer "
                              f"within {timeout().total_seconds():g} s (LLMINT8_DIST_TIMEOUT): {said}") from None


def all_gather(value: T, what: str) -> list[T]:
    """Every rank's value, in rank order, on every rank; a single process: [value]."""
    if not active():
        return [value]
    gathered = [None] * world_size()
    collective(lambda: torch.distributed.all_gather_object(gathered, value), what)
    return gathered


def agree(parts: dict[str, str], advice: str = "") -> None:
    """Refuse a run whose processes would combine results of different things: every rank must
    hold the same `parts` ({what: a digest}, e.g. the windows of the text, the model, the methods),
    else every rank ends with the same one-line error naming what differs, before any result is
    gathered."""
    if not active():
        return
    gathered = all_gather(parts, "comparing what each process evaluates")
    for other, theirs in enumerate(gathered):
        differing = [what for what in parts if theirs.get(what) != gathered[0].get(what)]
        if differing:
            raise LLMInt8Error(f"rank {other} of {world_size()} does not evaluate what rank 0 does: {' and '.join(differing)} differ"
                               f"{f' ({advice})' if advice else ''}; every process must be started with the same data, model and options")


def from_main(compute: Callable[[], T], what: str) -> T:
    """`compute()` run on rank 0 only, its result (or its error) given to every rank: calibration
    runs once, and reading a cache that ranks then write happens before any of them writes."""
    if not active():
        return compute()
    holder: list = [None]
    if is_main():
        try:
            holder[0] = (True, compute())
        except LLMInt8Error as exc:  # the same one-line error on every rank, not a wait for the timeout
            holder[0] = (False, exc)
    collective(lambda: torch.distributed.broadcast_object_list(holder, src=0), what)
    ok, value = holder[0]
    if not ok:
        raise value
    return value


def own_file(path: Path) -> Path:
    """The file this process appends to: `path` itself in a single process, NAME.rank<R>.SUFFIX
    under torchrun, so that no two processes ever write one file."""
    return path.with_name(f"{path.stem}.rank{rank()}{path.suffix}") if active() else path


def every_file(path: Path) -> list[Path]:
    """`path` and what each process of any earlier run wrote beside it: a resumed run of any size reads them all."""
    return [path, *sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))]


def barrier(what: str) -> None:
    if active():
        collective(torch.distributed.barrier, what)


def share(indices: list[int]) -> list[int]:
    """This rank's part of the work: every world_size-th item from its rank on."""
    return indices[rank() :: world_size()] if active() else indices


def finish() -> None:
    if active() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
