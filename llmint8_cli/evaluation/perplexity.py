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

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def make_windows(ids: list[int], seq_len: int, stride: int | None = None, bos_id: int | None = None, max_tokens: int | None = None) -> Windows:
    """Full windows over `ids` (capped at max_tokens) with the labels each one scores."""
    if seq_len < 2:
        raise DataError(f"seq-len must be at least 2, got {seq_len}")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    span = seq_len - (bos_id is not None)  # text tokens per window
    step = span if stride is None else stride
    if not 1 <= step <= span:
        raise DataError(f"stride must be between 1 and {span} for seq-len {seq_len}, got {stride}")
    if len(ids) < span:
        raise DataError(f"the text has {len(ids)} tokens, shorter than one window of {span}")
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


@torch.inference_mode()
def perplexity(model, windows: Windows, batch_size: int = 1, progress: Callable[[int], None] | None = None) -> PerplexityResult:
    """exp(mean NLL) of the scored tokens; batched, one forward per batch of windows."""
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(windows.input_ids), batch_size):
        ids = windows.input_ids[start : start + batch_size].to(device)
        labels = windows.labels[start : start + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum").item()
        if progress is not None:
            progress(len(ids))
    tokens = windows.scored_tokens
    return PerplexityResult(math.exp(total / tokens), total, tokens, len(windows.input_ids))
