"""The CPU engines a user would pick instead of llmint8, timed by `bench MODEL` on the same weights
beside our rows: CTranslate2 int8 and float32 (a pip wheel: `llmint8[peers]`; CTranslate2 has no
bf16 on CPU, so float32 is its 16-bit row) and llama.cpp Q8_0 (llama-cpp-python, built from source:
`make peers`). Each is optional: where its package is absent, or it cannot take the model, its rows
are skipped with a one-line note.

The bench feeds random token ids, so an engine gets a word-level vocabulary of the model's size
("<0>", "<1>", ...) instead of the model's tokenizer: the same ids run the same computation, and a
shape alone (`--random-weights`) has no tokenizer to give.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

CTRANSLATE2 = "CTranslate2"


def token(index: int) -> str:
    return f"<{index}>"


def word_level_tokenizer(vocab_size: int):
    """A tokenizer whose every id is one word ("<id>"), for engines that take tokens as strings."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({token(i): i for i in range(vocab_size)}, unk_token=token(0))),
                                   unk_token=token(0), bos_token=token(1), eos_token=token(2))


def save_16bit(model: nn.Module, folder: Path) -> Path:
    """The model's weights and config as a plain transformers folder (a GGUF-loaded model refuses
    save_pretrained), with the word-level tokenizer."""
    import safetensors.torch

    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_model(model, str(folder / "model.safetensors"))  # tied tensors written once
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config))
    word_level_tokenizer(model.config.get_text_config().vocab_size).save_pretrained(folder)
    return folder


class CTranslate2Engine:
    """A CTranslate2 Generator, called as bench calls our models: prefill = one forward over the
    prompt, decode = greedy generation of exactly `new_tokens` tokens."""

    def __init__(self, folder: Path, compute_type: str):
        import ctranslate2

        self.generator = ctranslate2.Generator(str(folder), device="cpu", compute_type=compute_type, intra_threads=torch.get_num_threads(), inter_threads=1)
        self.weight_bytes = (folder / "model.bin").stat().st_size

    def prefill(self, ids: torch.Tensor) -> None:
        self.generator.forward_batch(ids.tolist())

    def decode(self, ids: torch.Tensor, new_tokens: int) -> None:
        prompts = [[token(i) for i in row] for row in ids.tolist()]
        self.generator.generate_batch(prompts, max_length=new_tokens, min_length=new_tokens, sampling_topk=1, include_prompt_in_result=False)


def ctranslate2_isa() -> str | None:
    """The instruction set CTranslate2 is told to use: AVX512 where torch sees it (by itself it picks
    AVX2 on Intel), unless the user chose one (CT2_FORCE_CPU_ISA)."""
    if "CT2_FORCE_CPU_ISA" not in os.environ and torch.backends.cpu.get_cpu_capability() == "AVX512":
        os.environ["CT2_FORCE_CPU_ISA"] = "AVX512"  # read when the library loads
    return os.environ.get("CT2_FORCE_CPU_ISA")


def ctranslate2_engines(saved: Path, notes: list[str]) -> dict[str, CTranslate2Engine]:
    """CTranslate2's int8 and float32 rows of the model `saved` (save_16bit); none, with a note, where
    CTranslate2 is absent or cannot convert the model."""
    isa = ctranslate2_isa()
    try:
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        notes.append(f"{CTRANSLATE2}: not installed; pip install 'llmint8[peers]'")
        return {}
    engines = {}
    for quantization, row in (("int8", f"{CTRANSLATE2} int8"), ("float32", f"{CTRANSLATE2} fp32")):
        target = saved.parent / f"ctranslate2-{quantization}"
        try:
            TransformersConverter(str(saved), low_cpu_mem_usage=True).convert(str(target), quantization=quantization, force=True)
            engines[row] = CTranslate2Engine(target, quantization)
        except Exception as exc:  # an architecture it does not know, a config it cannot read
            from llmint8_cli.errors import one_line

            notes.append(f"{CTRANSLATE2}: cannot take this model ({type(exc).__name__}: {one_line(exc)})")
            return {}
    notes.append(f"{CTRANSLATE2}: per-row int8 weights and activations without decomposition, head and embeddings int8 too; float32 is its 16-bit row on CPU; "
                 f"CT2_FORCE_CPU_ISA={isa or 'its own choice'}, {torch.get_num_threads()} threads")
    return engines


def engines(saved: Path, notes: list[str]) -> dict:
    """Every peer engine's rows for the model `saved` (save_16bit), each absent one said in `notes`."""
    return ctranslate2_engines(saved, notes)
