"""Perplexity over fixed-length windows of one long token stream.

Protocol (stated in every result):
* The text is tokenized once. Windows hold `seq_len` tokens; only full windows are scored.
* BOS: with bos="window" and a tokenizer that opens a fresh sequence with BOS, every window is
  [BOS] + (seq_len - 1) text tokens. With bos="text" the tokenizer's own special tokens are
  applied once to the whole text (a BOS at its start only) and each window is seq_len tokens of
  that stream. Either way a window's first text token has no text before it and is not scored,
  so the BOS is context only (this reproduces the issue's Gemma-3 reference of 22.45).
* stride: windows start every `stride` tokens (default: no overlap). With overlap, a window
  scores only the tokens that no earlier window scored, so each token counts once.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llmint8_cli import distributed
from llmint8_cli.data import append_jsonl, read_appended_jsonl
from llmint8_cli.models import input_device
from llmint8_cli.errors import DataError

IGNORE = -100
BOS_MODES = ("window", "text")


@dataclass(frozen=True)
class Windows:
    input_ids: torch.Tensor  # [w, seq_len]
    labels: torch.Tensor  # [w, seq_len], IGNORE where not scored
    bos_per_window: bool

    @property
    def scored_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    def digest(self) -> str:
        """Identifies the exact tokens and labels (dataset, tokenizer, seq-len, stride, BOS mode, cap)."""
        h = hashlib.sha256()
        for tensor in (self.input_ids, self.labels):
            h.update(str(tuple(tensor.shape)).encode())
            h.update(tensor.numpy().tobytes())
        return h.hexdigest()[:16]


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer opens a fresh sequence with its BOS token."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a").input_ids
    return bos is not None and len(ids) > 0 and ids[0] == bos


def tokenize(tokenizer, text: str, bos: str) -> tuple[list[int], int | None]:
    """(token ids, BOS id to put in front of every window or None)."""
    if bos not in BOS_MODES:
        raise DataError(f"bos must be one of {BOS_MODES}, got {bos!r}")
    if bos == "window" and adds_bos(tokenizer):
        return tokenizer(text, add_special_tokens=False).input_ids, tokenizer.bos_token_id
    return tokenizer(text).input_ids, None


def make_windows(ids: list[int], seq_len: int, stride: int | None = None, bos_id: int | None = None, max_tokens: int | None = None,
                 source: str = "the text") -> Windows:
    """Full windows over `ids` (capped at max_tokens) with the labels each one scores; `source` names the text in errors."""
    if seq_len < 2:
        raise DataError(f"seq-len must be at least 2, got {seq_len}")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    span = seq_len - (bos_id is not None)  # text tokens per window
    step = span if stride is None else stride
    if not 1 <= step <= span:
        raise DataError(f"stride must be between 1 and {span} for seq-len {seq_len}, got {stride}")
    if len(ids) < span:
        raise DataError(f"{source} has {len(ids)} tokens{' (after --max-tokens)' if max_tokens is not None else ''}, shorter than one window of {span}")
    stream = torch.tensor(ids, dtype=torch.long)
    starts = torch.arange(0, len(ids) - span + 1, step)
    content = stream[starts[:, None] + torch.arange(span)]
    labels = content.clone()
    labels[0, :1] = IGNORE  # a window's first text token has no text before it
    labels[1:, : max(span - step, 1)] = IGNORE
    if bos_id is not None:
        bos = torch.full((len(starts), 1), bos_id, dtype=torch.long)
        content = torch.cat([bos, content], dim=1)
        labels = torch.cat([torch.full_like(bos, IGNORE), labels], dim=1)
    return Windows(content, labels, bos_id is not None)


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # sum of token negative log-likelihoods (nats)
    tokens: int
    windows: int
    reused: int = 0  # windows whose NLL came from the cache


MAX_NLL_PER_TOKEN = 1000.0  # nats: a probability of e^-1000 for every token of a window; no real model is that far off


class WindowCache:
    """Each window's NLL appended to a JSON Lines file as it is computed, so a stopped run resumes.

    One file per (variant folder, Windows.digest); the processes of a torchrun each append to their
    own (`.rank<R>` before the suffix) and a resumed run of any size reads them all. Every line read
    back is checked: a window index of these windows, and an NLL that a window can have (finite,
    >= 0, at most MAX_NLL_PER_TOKEN per scored token); anything else is a one-line error naming
    the line, never a wrong perplexity.
    """

    def __init__(self, folder: Path, windows: Windows):
        shared = Path(folder) / f"ppl-{windows.digest()}.jsonl"
        self.files, self.path = distributed.every_file(shared), distributed.own_file(shared)
        self.scored = (windows.labels[:, 1:] != IGNORE).sum(dim=1).tolist()

    def load(self) -> dict[int, float]:
        """The windows done so far; a half-written last line is cut off so that appends stay whole."""
        done = {}
        for path in self.files:
            for number, entry in read_appended_jsonl(path):
                window, nll = (entry.get("window"), entry.get("nll")) if isinstance(entry, dict) else (None, None)
                if type(window) is not int or not 0 <= window < len(self.scored):
                    raise DataError(f"{path}:{number}: 'window' must be an index below {len(self.scored)}, got {window!r:.40}")
                if isinstance(nll, bool) or not isinstance(nll, (int, float)) or not 0 <= nll <= MAX_NLL_PER_TOKEN * self.scored[window]:
                    raise DataError(f"{path}:{number}: 'nll' must be a number from 0 to {MAX_NLL_PER_TOKEN:g} per scored token "
                                    f"({self.scored[window]} in window {window}), got {nll!r:.40}")
                done[window] = float(nll)
        return done

    def append(self, nll: dict[int, float]) -> None:
        append_jsonl(self.path, [{"window": i, "nll": v} for i, v in nll.items()])


@torch.inference_mode()
def perplexity(model, windows: Windows, batch_size: int = 1, progress: Callable[[int], None] | None = None, cache: WindowCache | None = None) -> PerplexityResult:
    """exp(mean NLL) of the scored tokens; batched, one forward per batch of windows not yet in `cache`.

    Under torchrun each process computes every world_size-th window left and all of them gather
    the NLLs, summed in window order: the same figure, to the last digit, as one process.
    `progress` counts the run's windows (this process's, times the number of processes)."""
    device = input_device(model)
    count = len(windows.input_ids)
    nll = distributed.from_main(cache.load, "reading the window cache") if cache is not None else {}
    todo = [i for i in range(count) if i not in nll]
    reused = count - len(todo)
    if progress is not None and reused:
        progress(reused)
    mine, left, processes = distributed.share(todo), len(todo), distributed.world_size()
    for start in range(0, len(mine), batch_size):
        chosen = mine[start : start + batch_size]
        ids = windows.input_ids[chosen].to(device)
        labels = windows.labels[chosen].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = labels[:, 1:]
        # Flattened to (tokens, vocab): a class dimension that is not the last one runs ~10x slower on CPU.
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="none").view_as(targets)
        batch = dict(zip(chosen, per_token.double().sum(dim=1).tolist()))
        nll.update(batch)
        if cache is not None:
            cache.append(batch)
        if progress is not None:
            step = min(len(chosen) * processes, left)
            progress(step)
            left -= step
    for part in distributed.all_gather({i: nll[i] for i in mine}, "gathering the window NLLs"):
        nll.update(part)
    if progress is not None and left:
        progress(left)
    total = sum(nll[i] for i in range(count))
    tokens = windows.scored_tokens
    mean = total / tokens
    return PerplexityResult(math.inf if mean >= math.log(sys.float_info.max) else math.exp(mean), total, tokens, count, reused)  # NaN stays NaN
