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

import functools
import json
import os
from pathlib import Path

import torch
from torch import nn

from llmint8_cli.errors import one_line
from llmint8_cli.evaluation.speed import DECODE_PROMPT_TOKENS

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
            notes.append(f"{CTRANSLATE2}: cannot take this model ({type(exc).__name__}: {one_line(exc)})")
            return {}
    notes.append(f"{CTRANSLATE2}: per-row int8 weights and activations without decomposition, head and embeddings int8 too; float32 is its 16-bit row on CPU; "
                 f"CT2_FORCE_CPU_ISA={isa or 'its own choice'}, {torch.get_num_threads()} threads")
    return engines


LLAMA_CPP = "llama.cpp Q8_0"
LLAMA_MODEL_TYPES = ("llama", "mistral")  # what write_llama_gguf maps (llama.cpp's "llama" architecture)


def permuted_for_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from transformers' half-split rotary layout to llama.cpp's interleaved one (as llama.cpp's converter permutes them)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(saved: Path, target: Path) -> None:
    """The model `saved` (save_16bit, a Llama-architecture model) as a GGUF file whose matrices are
    Q8_0 (embeddings and head too, as llama.cpp's own Q8_0 files) and norms F32, written with the
    gguf package, without a tokenizer (tokenizer.ggml.model "none": bench feeds token ids)."""
    import gguf
    import safetensors.torch

    config = json.loads((saved / "config.json").read_text())
    tensors = safetensors.torch.load_file(str(saved / "model.safetensors"))
    if "model.embed_tokens.weight" not in tensors:  # tied: save_model kept the head's name; llama.cpp reads a missing head as the embeddings
        tensors["model.embed_tokens.weight"] = tensors.pop("lm_head.weight")
    heads, kv_heads, hidden = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    writer = gguf.GGUFWriter(str(target), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("none")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    for key, tensor in tensors.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            continue
        data = tensor.float()
        if key.endswith("q_proj.weight"):
            data = permuted_for_rope(data, heads)
        elif key.endswith("k_proj.weight"):
            data = permuted_for_rope(data, kv_heads)
        array = data.numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@functools.cache
def _silent_log():
    """A llama.cpp log callback that prints nothing (kept alive: llama.cpp holds the pointer)."""
    import llama_cpp

    return llama_cpp.llama_log_callback(lambda level, text, user_data: None)


class LlamaCppEngine:
    """A llama.cpp context of the GGUF, through llama-cpp-python's C API: prefill = one decode of
    the prompt with every position's logits (as ours and CTranslate2's), decode = greedy steps of
    every sequence together (one batch, a sequence id each)."""

    def __init__(self, path: Path, vocab_size: int, context: int, batch_tokens: int, sequences: int):
        import llama_cpp

        llama_cpp.llama_log_set(_silent_log(), None)  # llama.cpp's loading log off stderr: a failure raises here instead
        self.api = llama_cpp
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = context * sequences, batch_tokens, batch_tokens, sequences
        params.n_threads = params.n_threads_batch = torch.get_num_threads()
        self.context = llama_cpp.llama_init_from_model(self.model, params)
        self.batch = llama_cpp.llama_batch_init(batch_tokens, 0, sequences)
        self.vocab_size, self.weight_bytes = vocab_size, path.stat().st_size  # the GGUF holds no vocabulary: the logits' width is the config's

    def __del__(self) -> None:
        api = getattr(self, "api", None)
        if api is not None and getattr(self, "context", None):
            api.llama_batch_free(self.batch)
            api.llama_free(self.context)
            api.llama_model_free(self.model)

    def _run(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        batch = self.batch
        for index, (token_id, position, sequence, logits) in enumerate(entries):
            batch.token[index], batch.pos[index], batch.n_seq_id[index], batch.logits[index] = token_id, position, 1, logits
            batch.seq_id[index][0] = sequence
        batch.n_tokens = len(entries)
        if self.api.llama_decode(self.context, batch) != 0:
            raise RuntimeError("llama_decode failed")
        self.outputs = [index for index, entry in enumerate(entries) if entry[3]]  # the batch indices whose logits were computed

    def _clear(self) -> None:
        self.api.llama_memory_clear(self.api.llama_get_memory(self.context), True)

    def prefill(self, ids: torch.Tensor) -> None:
        self._clear()
        self._run([(token_id, position, 0, True) for position, token_id in enumerate(ids[0].tolist())])

    def decode(self, ids: torch.Tensor, new_tokens: int) -> None:
        import numpy as np

        self._clear()
        rows, length = ids.shape
        self._run([(token_id, position, row, position == length - 1) for row, prompt in enumerate(ids.tolist()) for position, token_id in enumerate(prompt)])
        for step in range(new_tokens - 1):  # the prompt's pass gave the first token, as in transformers' generate
            chosen = [int(np.ctypeslib.as_array(self.api.llama_get_logits_ith(self.context, index), shape=(self.vocab_size,)).argmax()) for index in self.outputs]
            self._run([(token_id, length + step, row, True) for row, token_id in enumerate(chosen)])


def llama_cpp_engines(saved: Path, prompt_lengths: list[int], batches: list[int], new_tokens: int, notes: list[str]) -> dict:
    """llama.cpp's Q8_0 row of the model `saved` (save_16bit); none, with a note, where
    llama-cpp-python is absent or the model is no Llama-architecture model."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        notes.append(f"{LLAMA_CPP}: not installed; `make peers` builds llama-cpp-python")
        return {}
    config = json.loads((saved / "config.json").read_text())
    if config.get("model_type") not in LLAMA_MODEL_TYPES:
        notes.append(f"{LLAMA_CPP}: bench writes GGUF files of {', '.join(LLAMA_MODEL_TYPES)} models only, not {config.get('model_type')}")
        return {}
    target = saved.parent / "model-q8_0.gguf"
    write_llama_gguf(saved, target)
    longest = max(max(prompt_lengths), DECODE_PROMPT_TOKENS + new_tokens)
    engine = LlamaCppEngine(target, config["vocab_size"], longest, max(max(prompt_lengths), max(batches) * DECODE_PROMPT_TOKENS), max(batches))
    notes.append(f"{LLAMA_CPP}: written with the gguf package from the same weights (embeddings and head Q8_0 too), {torch.get_num_threads()} threads")
    return {LLAMA_CPP: engine}


def engines(saved: Path, prompt_lengths: list[int], batches: list[int], new_tokens: int, notes: list[str]) -> dict:
    """Every peer engine's rows for the model `saved` (save_16bit), each absent one said in `notes`."""
    return {**ctranslate2_engines(saved, notes), **llama_cpp_engines(saved, prompt_lengths, batches, new_tokens, notes)}
