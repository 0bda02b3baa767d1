"""Int8Linear and quantize_model on real layers and tiny models of each architecture."""

import copy

import pytest
import torch
from torch import nn

from conftest import STORIES, needs_stories, tiny_model
from llmint8_cli import Int8Linear, quantize_model
from llmint8_cli.core import get_method
from llmint8_cli.core import reference as R
from llmint8_cli.errors import InvalidArgumentError
from llmint8_cli.nn import quantizable_layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_linear_is_a_drop_in_for_linear(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(172, 40).to(dtype)
    layer = Int8Linear.from_linear(linear)
    for shape in [(172,), (1, 172), (2, 3, 172), (0, 172)]:
        x = torch.randn(*shape).to(dtype)
        y = layer(x)
        assert y.dtype == dtype and y.shape == (*shape[:-1], 40)
        if x.numel():
            expected = linear(x).float()
            assert (y.float() - expected).abs().max() < 0.05 * expected.abs().max() + 0.02


def test_stored_and_runtime_outlier_paths_both_run():
    torch.manual_seed(1)
    linear = nn.Linear(64, 32)
    layer = Int8Linear.from_linear(linear, "llm.int8", 6.0, outlier_idx=torch.tensor([5]))
    assert layer.outlier_idx.tolist() == [5] and torch.equal(layer.outlier_weight[:, 0], linear.weight[:, 5])
    x = torch.randn(4, 64)
    x[:, 5] = 30.0  # stored outlier
    x[1, 9] = -12.0  # run-time outlier only
    prepared = R.QuantizedWeight(R.Quantized(layer.weight, layer.weight_scale, None), layer.outlier_idx.long(), layer.outlier_weight)
    cols = R.decomposed_columns(x, get_method("llm.int8"), 6.0, prepared.outlier_idx)
    assert cols.tolist() == [5, 9]
    y = layer(x)
    assert (y - linear(x)).abs().max() < 0.05


def test_int8_linear_moves_and_rebuilds_its_prepared_weight():
    layer = Int8Linear.from_linear(nn.Linear(16, 8))
    x = torch.randn(2, 16)
    first = layer(x)
    layer.weight_scale.mul_(2)  # in-place change: same storage, results follow the buffers
    layer.weight = layer.weight.clone()  # replaced buffer: the prepared weight is rebuilt
    assert torch.allclose(layer(x) - layer.bias, 2 * (first - layer.bias), atol=1e-5)


def test_int8_linear_rejects_fp16_method_and_bad_threshold():
    with pytest.raises(InvalidArgumentError):
        Int8Linear(4, 4, method="fp16")
    with pytest.raises(InvalidArgumentError):
        Int8Linear.from_linear(nn.Linear(4, 4), threshold=0.0)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "gemma3"])
def test_quantize_model_keeps_head_embeddings_and_ties(arch):
    model = tiny_model(arch, outlier_scale=30.0)
    reference = copy.deepcopy(model)
    head_before = model.get_output_embeddings().weight
    quantize_model(model, "llm.int8")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and not isinstance(m, Int8Linear)]
    assert linears == [model.get_output_embeddings()]
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is head_before
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        a, b = model(ids).logits, reference(ids).logits
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() < 0.1 * b.abs().max()


def test_skip_patterns_keep_matching_layers_16bit():
    model = tiny_model("llama")
    quantize_model(model, "llm.int8", skip=["*.mlp.down_proj"])
    names = {n for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert names and not any(n.endswith("down_proj") for n in names)
    assert not list(quantizable_layers(tiny_model("llama"), skip=["*"]))


def test_fp16_method_leaves_the_model_untouched():
    model = tiny_model("llama")
    assert not any(isinstance(m, Int8Linear) for m in quantize_model(model, "fp16").modules())


@needs_stories
def test_stories260k_all_methods_stay_close_to_fp32():
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    ids = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torch.log_softmax(base(ids).logits, -1)
        for name in ["vectorwise", "llm.int8", "llm.int8-zp"]:
            out = torch.log_softmax(quantize_model(copy.deepcopy(base), name)(ids).logits, -1)
            kl = torch.sum(ref.exp() * (ref - out), -1).mean()
            assert kl < 0.01, name
