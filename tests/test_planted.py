"""The planted-outlier models of the fidelity benchmark (issue #47): the same function in 16-bit,
and features the paper's analysis calls systematic."""

import pytest
import torch

from conftest import tiny_model
from llmint8_cli import activations
from llmint8_cli.evaluation.planted import chosen_dims, plant
from llmint8_cli.nn.convert import as_linear, quantizable_layers


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
@pytest.mark.parametrize("place", ["attention", "mlp", "both"])
def test_planting_keeps_the_function_and_makes_systematic_features(arch, place):
    model = tiny_model(arch).double()  # float64 (Gemma's norm still multiplies in fp32): what is left is rounding
    ids = torch.randint(4, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    dims = chosen_dims(model.config.hidden_size, 2, seed=3)
    assert plant(model, dims, 60.0, place) == model.config.num_hidden_layers * (2 if place == "both" else 1)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(after, before, rtol=1e-6, atol=1e-6)  # a wrong planting moves logits by O(0.1)

    layers = dict(quantizable_layers(model))
    stats = activations.collect(model.float(), ids.split(1), list(layers), 6.0)
    report = activations.analyze(stats, {n: tuple(as_linear(m).weight.shape) for n, m in layers.items()}, model.config.hidden_size)
    assert set(dims) <= set(report["systematic_features"]), report["systematic_features"]


def test_an_unknown_place_or_factor_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="place must be one of"):
        plant(model, [1], 10.0, "embeddings")
    with pytest.raises(ValueError, match="factor must be positive"):
        plant(model, [1], 0.0, "mlp")
