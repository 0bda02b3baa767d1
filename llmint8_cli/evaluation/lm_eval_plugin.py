"""lm-eval model types for llmint8: `llmint8` (`--model_args path=OUT`) and the unpadded HFLM.

lm-eval 0.4 discovers no model plugins: `llmint8 lm-eval ARGS` imports this module, which
registers the type, and runs lm-eval's own command line. From Python, import this module before
`lm_eval.simple_evaluate(model="llmint8", ...)`.
"""

from __future__ import annotations

import logging

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from llmint8_cli.evaluation import zeroshot
from llmint8_cli.evaluation.variants import resolve_device, resolve_dtype


class UnpaddedHFLM(HFLM):
    """HFLM that runs a sequence-wide int8 model one request per forward pass (zeroshot.sequence_wide).

    `llmint8 eval-zeroshot` and the `llmint8` model type both go through it, so neither pads.
    """

    def __init__(self, pretrained, **kwargs):
        self.unpadded = zeroshot.sequence_wide(pretrained)
        if self.unpadded:
            kwargs["batch_size"] = 1
        super().__init__(pretrained=pretrained, **kwargs)


@register_model("llmint8")
class LLMInt8LM(UnpaddedHFLM):
    """UnpaddedHFLM over `llmint8_cli.load(path)`; `dtype` (auto|fp32|fp16|bf16) casts the 16-bit tensors."""

    def __init__(self, path: str, device: str = "auto", dtype: str = "auto", verify: bool = True, **kwargs):
        from transformers import AutoTokenizer

        from llmint8_cli.checkpoint.load import load

        run_device = resolve_device(device or "auto")
        model = load(path, dtype=resolve_dtype(dtype, run_device), verify_files=str(verify).lower() not in ("false", "0")).to(run_device)
        requested = kwargs.get("batch_size", 1)
        super().__init__(model, tokenizer=AutoTokenizer.from_pretrained(path), device=str(run_device), **kwargs)
        if self.unpadded and str(requested) != "1":
            logging.getLogger(__name__).warning("llmint8: batch_size 1 (outlier columns span a sequence; lm-eval pads batches without a mask)")

