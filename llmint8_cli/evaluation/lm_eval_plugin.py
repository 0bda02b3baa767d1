"""lm-eval model types for llmint8: `llmint8` (`--model_args path=OUT`) and the unpadded HFLM.

lm-eval 0.4 discovers no model plugins: `llmint8 lm-eval ARGS` imports this module, which
registers the type, and runs lm-eval's own command line. From Python, import this module before
`lm_eval.simple_evaluate(model="llmint8", ...)`.
"""

from __future__ import annotations

import logging

import torch

from lm_eval.api.model import CacheHook
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from llmint8_cli.evaluation import zeroshot
from llmint8_cli.evaluation.request_cache import RequestCache
from llmint8_cli import distributed, models
from llmint8_cli.evaluation.variants import resolve_device, resolve_dtype


class RequestCacheHook(CacheHook):
    """lm-eval's hook for answers as they are computed, writing them to our JSON-lines cache."""

    def __init__(self, cache: RequestCache):
        super().__init__(None)
        self.cache = cache

    def add_partial(self, attr, req, res) -> None:
        self.cache.add(attr, req, res)


class UnpaddedHFLM(HFLM):
    """HFLM that runs a sequence-wide int8 model one request per forward pass (zeroshot.sequence_wide),
    and answers from `request_cache` what it answered before (request_cache.py: data, no pickles).

    `llmint8 eval-zeroshot` and the `llmint8` model type both go through it, so neither pads.
    """

    def __init__(self, pretrained, request_cache: RequestCache | None = None, **kwargs):
        self.unpadded = zeroshot.sequence_wide(pretrained)
        if self.unpadded:
            kwargs["batch_size"] = 1
        super().__init__(pretrained=pretrained, **kwargs)
        self._device = models.input_device(pretrained)  # a placed model's main device (lm-eval reads its first parameter's, maybe on meta)
        if distributed.active() and torch.distributed.is_initialized():  # under torchrun (eval-zeroshot joins the run): lm-eval shares the documents out
            self._rank, self._world_size = distributed.rank(), distributed.world_size()
        self.request_cache = request_cache
        if request_cache is not None:
            self.set_cache_hook(RequestCacheHook(request_cache))

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """lm-eval's gather of a tensor from every process (accelerate's, without an Accelerator)."""
        if self.world_size <= 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        distributed.collective(lambda: torch.distributed.all_gather(parts, tensor), "gathering lm-eval's request counts")
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst=0):
        """lm-eval's gather of each process's samples and metrics, handed back in document order."""
        if self.world_size <= 1:
            return [obj]
        gathered = [None] * self.world_size if self.rank == dst else None
        distributed.collective(lambda: torch.distributed.gather_object(obj, gathered, dst=dst), "gathering lm-eval's samples")
        return in_document_order(gathered) if gathered is not None else None

    def barrier(self) -> None:
        distributed.barrier("waiting for lm-eval's requests")

    def _answer(self, kind: str, requests, compute, disable_tqdm: bool):
        """Cached answers where there are any; the model computes the rest (the hook keeps each)."""
        if self.request_cache is None:
            return compute(requests, disable_tqdm=disable_tqdm)
        known = [None if kind == "generate_until" and r.args[1].get("do_sample") else self.request_cache.get(kind, r.args) for r in requests]
        missing = [r for r, answer in zip(requests, known) if answer is None]
        fresh = iter(compute(missing, disable_tqdm=disable_tqdm) if missing else [])
        return [next(fresh) if answer is None else answer for answer in known]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._answer("loglikelihood", requests, super().loglikelihood, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._answer("loglikelihood_rolling", requests, super().loglikelihood_rolling, disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._answer("generate_until", requests, super().generate_until, disable_tqdm)


def in_document_order(parts: list) -> list:
    """lm-eval gives process r the documents r, r + N, r + 2N, ... and chains what it gathers
    process by process; interleaved back here, every list is in document order as in one process,
    so sums, means and the bootstrap's resamples give the one-process figures to the last digit.
    ({task: [samples]} and {task: {metric: [values]}}; a list that does not fit is left as is.)"""
    first = parts[0]
    if isinstance(first, dict) and all(isinstance(p, dict) and p.keys() == first.keys() for p in parts):
        per_key = {key: in_document_order([p[key] for p in parts]) for key in first}
        return [{key: per_key[key][r] for key in first} for r in range(len(parts))]
    if all(isinstance(p, list) for p in parts):
        total = sum(len(p) for p in parts)
        if all(len(p) == len(range(r, total, len(parts))) for r, p in enumerate(parts)):
            return [[parts[i % len(parts)][i // len(parts)] for i in range(total)], *([] for _ in parts[1:])]
    return parts


@register_model("llmint8")
class LLMInt8LM(UnpaddedHFLM):
    """UnpaddedHFLM over `llmint8_cli.load(path)`; `dtype` (auto|fp32|fp16|bf16) casts the 16-bit tensors."""

    def __init__(self, path: str, device: str = "auto", dtype: str = "auto", verify: bool = True, **kwargs):
        from llmint8_cli.checkpoint.load import load

        run_device = resolve_device(device or "auto")
        model = load(path, dtype=resolve_dtype(dtype, run_device), verify_files=str(verify).lower() not in ("false", "0")).to(run_device)
        requested = kwargs.get("batch_size", 1)
        super().__init__(model, tokenizer=models.load_tokenizer(models.ModelSource("folder", path)), device=str(run_device), **kwargs)
        if self.unpadded and str(requested) != "1":
            logging.getLogger(__name__).warning("llmint8: batch_size 1 (outlier columns span a sequence; lm-eval pads batches without a mask)")

