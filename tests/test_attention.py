"""The native attention (kernels/cpu/attention.cpp, nn/attention.py): the prompt and decode kernels
against a float64 reference on every mask shape transformers makes, as torch ops, and inside models
(eager, compiled, and every call they leave to SDPA)."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmint8_cli import compilation
from llmint8_cli.nn import attention

needs_kernel = pytest.mark.skipif(not attention.native_attention_here(), reason="no AVX512-BF16 here")


def qkv(batch: int, heads: int, kv_heads: int, queries: int, keys: int, dim: int, seed: int = 0):
    """bf16 q [b, h, l, d] and k, v [b, kv, s, d] as transformers hands them over: transposed views."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, queries, heads, dim, generator=g) * 2).bfloat16().transpose(1, 2)
    kv = (torch.randn(batch, keys, 2 * kv_heads, dim, generator=g) * 2).bfloat16().transpose(1, 2)
    return q, kv[:, :kv_heads], kv[:, kv_heads:]


def mask_of(kind: str, batch: int, queries: int, keys: int) -> torch.Tensor | None:
    rows, cols = torch.arange(queries)[:, None], torch.arange(keys)[None, :]
    if kind == "causal":
        return None
    if kind == "random":
        return torch.rand(batch, 1, queries, keys, generator=torch.Generator().manual_seed(1)) > 0.5
    if kind == "left padding":  # causal after 0, 7, 14... pad keys: the pad queries attend to nothing
        return ((rows >= cols) & (cols >= 7 * torch.arange(batch)[:, None, None, None])).expand(batch, 1, queries, keys)
    if kind == "static cache tail":  # a prompt in a longer cache: the keys past it are empty
        return (rows >= cols)[None, None]
    return ((rows >= cols) & (rows - cols < 40))[None, None]  # sliding window


def reference(q, k, v, mask, scale):
    """SDPA in float64 on the same bf16 inputs, [b, l, h, d]; rows with no allowed key are 0, as SDPA gives them."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask, is_causal=mask is None, scale=scale).transpose(1, 2)


@needs_kernel
@pytest.mark.parametrize("kind", ["causal", "random", "left padding", "static cache tail", "sliding window"])
@pytest.mark.parametrize("shape", [(1, 9, 3, 5, 64), (1, 4, 4, 37, 80), (2, 4, 2, 100, 128), (3, 2, 1, 129, 32)])
def test_the_kernel_is_as_close_to_the_reference_as_torchs_bf16_sdpa(kind, shape):
    """Across query blocks (32) and key blocks (64), grouped heads and head dims: the largest error
    against float64 is within torch's own bf16 SDPA's (the output's bf16 rounding), and a query that
    may attend to nothing gets 0 (a skipped or misplaced block would be off by whole units)."""
    batch, heads, kv_heads, queries, dim = shape
    keys = queries + 19 if kind in ("random", "static cache tail") else queries
    q, k, v = qkv(batch, heads, kv_heads, queries, keys, dim)
    mask, scale = mask_of(kind, batch, queries, keys), 1 / math.sqrt(dim)
    expected = reference(q, k, v, mask, scale)
    ours = torch.ops.llmint8_cpu.prompt_attention(q, k, v, mask, scale)
    group = heads // kv_heads
    torch_bf16 = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask,
                                                is_causal=mask is None, scale=scale).transpose(1, 2)
    assert ours.shape == (batch, queries, heads, dim) and ours.dtype == torch.bfloat16
    assert (ours.double() - expected).abs().max() <= 1.25 * (torch_bf16.double() - expected).abs().max() + 1e-3
    if mask is not None:
        empty = ~mask.expand(batch, heads, queries, keys).any(-1).transpose(1, 2)  # [b, l, h]
        assert torch.equal(ours[empty], torch.zeros_like(ours[empty]))


@needs_kernel
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", [(1, 9, 3, 40, 64), (8, 4, 2, 72, 80), (3, 2, 1, 17, 16), (1, 8, 8, 300, 128)])
def test_the_decode_kernel_is_as_close_to_the_reference_as_torchs_bf16_sdpa(masked, shape):
    """One query over a cache's keys (every key, or a static cache's boolean mask with a sequence that
    may attend to nothing): within torch's bf16 SDPA's error, 0 for the empty sequence."""
    batch, heads, kv_heads, keys, dim = shape
    q, k, v = qkv(batch, heads, kv_heads, 1, keys, dim)
    mask = None
    if masked:
        mask = torch.rand(batch, 1, 1, keys, generator=torch.Generator().manual_seed(2)) > 0.3
        mask[-1] = False if batch > 1 else mask[-1]
    scale = 1 / math.sqrt(dim)
    group = heads // kv_heads
    expected = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1), attn_mask=mask,
                                              scale=scale).transpose(1, 2)
    torch_bf16 = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask, scale=scale).transpose(1, 2)
    ours = torch.ops.llmint8_cpu.decode_attention(q, k, v, mask, scale)
    assert ours.shape == (batch, 1, heads, dim)
    assert (ours.double() - expected).abs().max() <= 1.25 * (torch_bf16.double() - expected).abs().max() + 1e-3
    if masked and batch > 1:
        assert torch.equal(ours[-1], torch.zeros_like(ours[-1]))


@needs_kernel
@pytest.mark.parametrize("masked", [False, True])
def test_the_kernels_pass_opcheck(masked):
    q, k, v = qkv(2, 4, 2, 40, 40, 32)
    torch.library.opcheck(torch.ops.llmint8_cpu.prompt_attention.default, (q, k, v, mask_of("left padding", 2, 40, 40) if masked else None, 0.125))
    torch.library.opcheck(torch.ops.llmint8_cpu.decode_attention.default, (q[:, :, :1], k, v, mask_of("left padding", 2, 40, 40)[:, :, -1:] if masked else None, 0.125))


def tiny_llama(dtype=torch.bfloat16):
    """A model whose heads the kernel takes (dim 16, grouped 2:1), through transformers' SDPA by default."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


@needs_kernel
def test_a_model_switched_to_it_keeps_sdpas_logits_within_bf16_noise_padded_or_not():
    """A padded batch (transformers' bool mask) and an unpadded one (is_causal): the positions that
    count agree with SDPA's as closely as two bf16 attentions can; the kernel ran for both."""
    model = tiny_llama()
    ids = torch.randint(4, 128, (2, 70), generator=torch.Generator().manual_seed(0))
    padding = torch.ones_like(ids)
    padding[0, :9] = 0
    with torch.inference_mode():
        before = [model(input_ids=ids).logits.float(), model(input_ids=ids, attention_mask=padding).logits.float()]
        assert attention.use_native_attention(model) is model and model.config._attn_implementation == attention.NAME
        with torch.profiler.profile() as profile:
            after = [model(input_ids=ids).logits.float(), model(input_ids=ids, attention_mask=padding).logits.float()]
    assert sum(e.count for e in profile.key_averages() if "prompt_attention" in e.key) == 2 * 2  # 2 layers, 2 forwards
    for sdpa, native in zip(before, after):  # the unpadded row of each; the padded one from its first real token
        assert (native[1] - sdpa[1]).norm() / sdpa[1].norm() < 2e-2
    assert (after[1][0, 9:] - before[1][0, 9:]).norm() / before[1][0, 9:].norm() < 2e-2


@needs_kernel
def test_a_decode_step_through_it_keeps_sdpas_logits_within_bf16_noise():
    """A decoded token over a dynamic cache (no mask: every key) and over a static one (its mask):
    the kernel runs, and the logits agree with SDPA's on the same cache as two bf16 attentions can."""
    import copy

    from transformers import DynamicCache, StaticCache

    model = tiny_llama()
    ids = torch.randint(4, 128, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for cache in (DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=48)):
            model.set_attn_implementation("sdpa")
            model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
            step = {"input_ids": ids[:, -1:], "use_cache": True, "cache_position": torch.tensor([ids.shape[1] - 1])}
            sdpa = model(**step, past_key_values=copy.deepcopy(cache)).logits.float()
            attention.use_native_attention(model)
            with torch.profiler.profile() as profile:
                native = model(**step, past_key_values=copy.deepcopy(cache)).logits.float()
            assert sum(e.count for e in profile.key_averages() if "decode_attention" in e.key) == 2  # 2 layers
            assert (native - sdpa).norm() / sdpa.norm() < 2e-2


@needs_kernel
def test_calls_it_does_not_cover_go_to_sdpa_unchanged():
    """fp32, and a prompt whose input needs a gradient give SDPA's logits bit for bit; a model set to
    eager attention stays eager."""
    model = tiny_llama()
    ids = torch.randint(4, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    fp32 = tiny_llama(torch.float32)
    sdpa = [model(inputs_embeds=embeds).logits, fp32(input_ids=ids).logits]
    attention.use_native_attention(model)
    attention.use_native_attention(fp32)
    assert torch.equal(model(inputs_embeds=embeds).logits, sdpa[0]) and torch.equal(fp32(input_ids=ids).logits, sdpa[1])
    eager = tiny_llama()
    eager.set_attn_implementation("eager")
    assert attention.use_native_attention(eager).config._attn_implementation == "eager"


@needs_kernel
def test_shapes_the_kernel_cannot_take_go_to_sdpa():
    """A batch of 1 queries against 2 of keys (SDPA broadcasts it), a 2-d mask, a head dim not a
    multiple of 16, prompt or decoded token: transformers' SDPA computes them, no error."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups = 2
    q, k, v = qkv(2, 4, 2, 20, 20, 32)
    q8, k8, v8 = qkv(1, 4, 2, 20, 20, 8)
    cases = [(q[:1], k, v, None), (q, k, v, mask_of("random", 1, 20, 20)[0, 0]), (q8, k8, v8, None), (q[:1, :, :1], k, v, None), (q8[:, :, :1], k8, v8, None)]
    for query, key, value, mask in cases:
        expected = sdpa_attention_forward(module, query, key, value, mask)[0]
        assert torch.equal(attention.attention(module, query, key, value, mask)[0], expected)


@needs_kernel
def test_a_compiled_prompt_calls_the_kernel_and_gives_eagers_logits():
    """Compiled, transformers materializes the causal mask (it cannot rule out packed sequences while
    tracing): the graph calls the kernel with it, no SDPA, and the logits are eager's (is_causal) to a
    bf16 unit with the same argmax (the kernel gives the same bits with the mask or without, and
    aot_eager gives eager's; Inductor's fused code around the op differs in a last bit here)."""
    model = attention.use_native_attention(tiny_llama())
    ids = torch.randint(4, 128, (2, 70), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch.inference_mode():
        explanation = torch._dynamo.explain(model)(input_ids=ids, use_cache=False)
        code = explanation.graphs[0].code
        assert explanation.graph_break_count == 0 and code.count("llmint8_cpu.prompt_attention") == 2 and "scaled_dot_product" not in code
        eager = model(input_ids=ids, use_cache=False).logits
        torch._dynamo.reset()
        compiled = compilation.compiled_forward(model)(input_ids=ids, use_cache=False).logits
    assert (compiled.float() - eager.float()).abs().max() <= 4e-3 and torch.equal(compiled.argmax(-1), eager.argmax(-1))
