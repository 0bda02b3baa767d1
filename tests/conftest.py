"""Shared fixtures: real data and models from ../shared when present, tiny random models always."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LLMINT8_SHARED", ROOT.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"
DATA = SHARED / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)


def pytest_sessionstart(session):
    """Compile the native CPU kernels before any test (once per machine; it says so on stderr,
    which a test that reads stderr must not see)."""
    from llmint8_cli.backends.cpu_kernels import native_kernels

    native_kernels()

def emulated_cuda():
    """The CUDA backend with llmint8.cu's kernels run on the CPU (a skip where they do not build here)."""
    from llmint8_cli.backends.cuda_emulated import EmulatedCudaBackend, emulator

    try:
        emulator()
    except Exception as exc:  # no compiler: the GPU run of the parity suite still covers the kernels
        pytest.skip(f"the CUDA kernels do not build for the CPU here ({type(exc).__name__})")
    return EmulatedCudaBackend()


needs_stories = pytest.mark.skipif(not (STORIES / "config.json").is_file(), reason="needs ../shared/models/stories260K")
needs_data = pytest.mark.skipif(not (DATA / "wikitext-2-raw" / "wiki.test.raw").is_file(), reason="needs ../shared/data")


ARCHITECTURES = ("llama", "opt", "gpt2", "gemma3", "gpt_neox", "gptj", "bloom", "falcon", "phi", "mistral", "qwen2", "mixtral", "qwen2_moe")
LINEAR_MISUSE = ("mamba", "phimoe")  # a layer whose weight the model reads (Mamba's dt_proj), a Linear whose forward is no linear map (PhiMoE's router)
MORE_ARCHITECTURES = ("phi3", "qwen3", "qwen3_moe", "olmo", "olmo2", "stablelm", "gpt_bigcode", "cohere", "granite", "granitemoe", "deepseek_v2", "deepseek_v3",
                      "jamba", "gemma2", "starcoder2", "glm", "smollm3", "mpt", "codegen", "opt350m", "llama4_text", "gpt_oss")


def tiny_config(arch: str):
    """A few-thousand-parameter config of each architecture the tests cover (vocab 128)."""
    import transformers
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, OPTConfig

    common = {"vocab_size": 128, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, **common}
    others = {
        "gpt_neox": lambda: transformers.GPTNeoXConfig(intermediate_size=64, max_position_embeddings=256, **small),
        "gptj": lambda: transformers.GPTJConfig(n_embd=32, n_layer=2, n_head=4, n_positions=256, rotary_dim=4, **common),
        "bloom": lambda: transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common),
        "falcon": lambda: transformers.FalconConfig(max_position_embeddings=256, **small),
        "phi": lambda: transformers.PhiConfig(intermediate_size=64, max_position_embeddings=256, **small),
        "mistral": lambda: transformers.MistralConfig(intermediate_size=64, num_key_value_heads=2, max_position_embeddings=256, **small),
        "qwen2": lambda: transformers.Qwen2Config(intermediate_size=64, num_key_value_heads=2, max_position_embeddings=256, **small),
        "mixtral": lambda: transformers.MixtralConfig(intermediate_size=64, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256, **small),
        "phi3": lambda: transformers.Phi3Config(intermediate_size=64, num_key_value_heads=2, max_position_embeddings=256, **small),
        "qwen3": lambda: transformers.Qwen3Config(intermediate_size=64, num_key_value_heads=2, head_dim=8, max_position_embeddings=256, **small),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2, num_key_value_heads=2,
                                                         head_dim=8, max_position_embeddings=256, **small),
        "olmo": lambda: transformers.OlmoConfig(intermediate_size=64, max_position_embeddings=256, **small),
        "olmo2": lambda: transformers.Olmo2Config(intermediate_size=64, max_position_embeddings=256, **small),
        "stablelm": lambda: transformers.StableLmConfig(intermediate_size=64, num_key_value_heads=4, max_position_embeddings=256, **small),
        "gpt_bigcode": lambda: transformers.GPTBigCodeConfig(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common),
        "cohere": lambda: transformers.CohereConfig(intermediate_size=64, max_position_embeddings=256, **small),
        "granite": lambda: transformers.GraniteConfig(intermediate_size=64, max_position_embeddings=256, **small),
        "granitemoe": lambda: transformers.GraniteMoeConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256, **small),
        "deepseek_v2": lambda: transformers.DeepseekV2Config(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                                                             first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=8,
                                                             qk_nope_head_dim=8, max_position_embeddings=256, **small),
        "deepseek_v3": lambda: transformers.DeepseekV3Config(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                                                             first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8,
                                                             qk_nope_head_dim=8, n_group=1, topk_group=1, max_position_embeddings=256, **small),
        "jamba": lambda: transformers.JambaConfig(intermediate_size=64, num_experts=2, num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1,
                                                  attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_dt_rank=4, num_key_value_heads=2,
                                                  use_mamba_kernels=False, **small),
        "gemma2": lambda: transformers.Gemma2Config(intermediate_size=64, num_key_value_heads=2, head_dim=8, max_position_embeddings=256, **small),
        "starcoder2": lambda: transformers.Starcoder2Config(intermediate_size=64, num_key_value_heads=2, max_position_embeddings=256, **small),
        "glm": lambda: transformers.GlmConfig(intermediate_size=64, num_key_value_heads=2, head_dim=8, max_position_embeddings=256, **small),
        "smollm3": lambda: transformers.SmolLM3Config(intermediate_size=64, num_key_value_heads=2, max_position_embeddings=256, **small),
        "mpt": lambda: transformers.MptConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=256, **common),
        "codegen": lambda: transformers.CodeGenConfig(n_embd=32, n_layer=2, n_head=4, n_positions=256, rotary_dim=4, **common),
        "opt350m": lambda: OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=24,
                                     do_layer_norm_before=False, **common),  # project_in / project_out around the decoder, as opt-350m
        "llama4_text": lambda: transformers.Llama4TextConfig(intermediate_size=64, intermediate_size_mlp=64, num_local_experts=4, num_experts_per_tok=1,
                                                             num_key_value_heads=2, head_dim=8, max_position_embeddings=256, **small),
        "gpt_oss": lambda: transformers.GptOssConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2, head_dim=8,
                                                     max_position_embeddings=256, **small),
        "mamba": lambda: transformers.MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=8, **common),
        "phimoe": lambda: transformers.PhimoeConfig(intermediate_size=64, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                                                    **small),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=48, shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                                          num_key_value_heads=2, max_position_embeddings=256, **small),
    }
    if arch in others:
        return others[arch]()
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common)
    if arch == "gemma3":
        return Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=16, **common)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, outlier_scale: float = 0.0):
    """A random model; outlier_scale > 0 plants large features in the input embeddings (columns 3 and 10)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    if outlier_scale:
        with torch.no_grad():
            model.get_input_embeddings().weight[:, [3, 10]] *= outlier_scale
    return model


def save_tiny(model, folder: Path, safe: bool = True) -> Path:
    model.save_pretrained(folder, safe_serialization=safe)
    return folder


def tiny_tokenizer():
    """A character-level tokenizer (printable ASCII and newline, 100 ids < 128, BOS first) that needs no download."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture
def tiny_llama_dir(tmp_path):
    return save_tiny(tiny_model("llama", outlier_scale=40.0), tmp_path / "tiny-llama")
