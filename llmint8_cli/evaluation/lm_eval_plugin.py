"""An lm-eval model type for llmint8 checkpoints: `--model llmint8 --model_args path=OUT`.

lm-eval 0.4 has no plugin discovery for model types, so this module registers the type and then
runs lm-eval's own command line:

    python -m llmint8_cli.evaluation.lm_eval_plugin --model llmint8 --model_args path=out/opt-13b-int8 \\
        --tasks hellaswag --batch_size 8

From Python, `import llmint8_cli.evaluation.lm_eval_plugin` before `lm_eval.simple_evaluate(model="llmint8", ...)`.
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


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
