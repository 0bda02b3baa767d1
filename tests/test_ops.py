"""Int8Linear as a torch op (issue #52, part 1): torch.library's checks, no graph break in a compiled
model of any architecture, torch.export, and the input gradient through the int8 layers."""

import copy

import pytest
import torch

from conftest import ARCHITECTURES, STORIES, needs_stories, tiny_model
from llmint8_cli import Int8Linear, ops, quantize_model
from llmint8_cli.nn.experts import unfuse_experts

METHODS = ("llm.int8", "vectorwise", "absmax", "zeropoint", "rowwise+decomp", "llm.int8-zp", "llm.int8-smooth", "llm.int8-rotate")


def layer_and_input(method: str, shape: tuple[int, ...] = (2, 5, 64)) -> tuple[Int8Linear, torch.Tensor]:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    smoothing = {"input_max": torch.rand(64) * 4 + 0.5} if method == "llm.int8-smooth" else {}
    layer = Int8Linear.from_linear(linear, method, outlier_idx=torch.tensor([3, 10]), rotation_block=16, **smoothing)
    x = torch.randn(*shape)
    x[..., 7] *= 20  # a run-time outlier column
    return layer, x


def op_arguments(layer: Int8Linear, x: torch.Tensor) -> tuple:
    return (x, layer.weight, layer.weight_scale, layer.weight_zero, layer.outlier_idx, layer.outlier_weight, layer.input_smooth, layer.bias,
            layer.method.name, layer.threshold, layer.rotation_block)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(2, 5, 64), (7, 64)])
def test_torch_library_opcheck_passes_for_every_method(method, shape):
    """Schema, fake implementation (shapes, dtypes, strides), autograd registration and the
    dispatcher's own consistency checks, with and without a gradient to record."""
    layer, x = layer_and_input(method, shape)
    torch.library.opcheck(ops.int8_linear_op, op_arguments(layer, x))
    torch.library.opcheck(ops.int8_linear_op, op_arguments(layer, x.clone().requires_grad_()))


@pytest.mark.parametrize("method", METHODS)
def test_a_compiled_layer_is_one_graph_and_gives_the_eager_output(method):
    layer, x = layer_and_input(method)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    assert torch.equal(torch.compile(layer, fullgraph=True)(x), layer(x))


def test_the_op_output_equals_the_layer_it_replaced_and_the_reference():
    """The op is the layer: the same values as the backend's own call and the reference's."""
    from llmint8_cli.backends import Backend

    for method in METHODS:
        layer, x = layer_and_input(method)
        reference = Backend().linear(x, layer.quantized_weight(), layer.method, layer.threshold, layer.bias)
        torch.testing.assert_close(ops.int8_linear_op(*op_arguments(layer, x)), reference, rtol=2e-5, atol=2e-5, msg=method)


def quantized(arch: str, method: str = "llm.int8"):
    model = tiny_model(arch, outlier_scale=40.0)
    unfuse_experts(model)
    return quantize_model(model, method)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_no_graph_break_in_a_quantized_model_of_any_architecture(arch):
    """One graph for the whole forward; mixture-of-experts blocks route a data-dependent number of
    tokens to each expert, which dynamo traces with capture_dynamic_output_shape_ops."""
    model = quantized(arch)
    ids = torch.randint(4, 100, (2, 12))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        explanation = torch._dynamo.explain(model)(input_ids=ids)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), [str(b.reason)[:300] for b in explanation.break_reasons]


def test_export_holds_one_op_per_quantized_layer_and_gives_the_eager_logits():
    model = quantized("llama")
    ids = torch.randint(4, 100, (1, 12))
    model(input_ids=ids[:, :1], use_cache=False)  # prepared: a compiled graph would take the CPU's native op, an exported one must not
    exported = torch.export.export(model, (), {"input_ids": ids, "use_cache": False})
    layers = sum(isinstance(m, Int8Linear) for m in model.modules())
    assert layers == 14 and sum(node.target == torch.ops.llmint8.int8_linear.default for node in exported.graph.nodes) == layers
    torch.testing.assert_close(exported.module()(input_ids=ids, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_the_input_gradient_is_grad_out_times_the_dequantized_weight(method):
    """bitsandbytes' rule: grad_x = grad_y W, W the int8 rows dequantized in the original basis and
    the stored outlier columns exact; nothing flows to the frozen int8 tensors."""
    layer, x = layer_and_input(method)
    x.requires_grad_()
    grad = torch.randn(2, 5, 48)
    layer(x).backward(grad)
    weight = ops.dequantized_weight(*op_arguments(layer, x)[1:7], layer.rotation_block)
    torch.testing.assert_close(x.grad, grad @ weight, rtol=1e-5, atol=1e-5)
    assert torch.equal(weight[:, layer.outlier_idx.long()], layer.outlier_weight.float())  # the stored columns exact
    assert all(t.grad is None for t in layer.buffers()) and not layer.bias.requires_grad


@needs_stories
def test_the_input_gradient_of_a_quantized_real_model_follows_the_16_bit_one():
    """The issue's case: stories260K's input gradient had cosine 0.055 with the 16-bit model's."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(STORIES).float().eval()
    int8 = quantize_model(copy.deepcopy(base), "llm.int8")
    ids = torch.randint(3, 500, (2, 64), generator=torch.Generator().manual_seed(0))

    def input_gradient(model) -> torch.Tensor:
        embeddings = model.get_input_embeddings()(ids).detach().requires_grad_()
        model(inputs_embeds=embeddings, labels=ids).loss.backward()
        return embeddings.grad.flatten()

    ours, theirs = input_gradient(int8), input_gradient(base)
    assert torch.nn.functional.cosine_similarity(ours, theirs, dim=0) >= 0.99
    assert 0.9 <= float(ours.norm() / theirs.norm()) <= 1.1


@needs_stories
def test_lora_on_an_int8_base_trains_like_lora_on_the_16_bit_model():
    """peft's LoRA (prepare_model_for_kbit_training, get_peft_model) on Int8Linear layers: the
    adapter learns through the int8 layers, and the loss falls as on the 16-bit base."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from llmint8_cli.nn.lora import lora_config

    base = AutoModelForCausalLM.from_pretrained(STORIES).float().eval()
    ids = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(0))

    def losses(model) -> list[float]:
        torch.manual_seed(1)
        config = lora_config(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
        model = peft.get_peft_model(peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        seen = []
        for _ in range(30):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            seen.append(loss.item())
        return seen, model

    sixteen, _ = losses(copy.deepcopy(base))
    eight, adapted = losses(quantize_model(copy.deepcopy(base), "llm.int8"))
    assert sum(type(m).__name__ == "Int8LoraLinear" for m in adapted.modules()) == 15  # 5 layers x 3 targets
    assert eight[-1] < 0.5 * eight[0] and abs(eight[-1] - sixteen[-1]) < 0.02 * sixteen[-1]
    with pytest.raises(Exception, match="would round it away"):
        adapted.merge_and_unload()


def test_the_prepared_weight_follows_in_place_changes_and_goes_with_the_layer():
    """The backend's state is made once per weight, again after an in-place change of any of the
    layer's tensors (load_state_dict copies into them), and freed with the layer."""
    import weakref

    from llmint8_cli.backends import Backend

    layer, x = layer_and_input("llm.int8")
    before = layer(x)
    with torch.no_grad():
        layer.weight_scale.mul_(2)
    after = layer(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, Backend().linear(x, layer.quantized_weight(), layer.method, layer.threshold, layer.bias), rtol=2e-5, atol=2e-5)
    assert ops.prepared_of(layer) is not None
    weight = weakref.ref(layer.weight)
    del layer
    assert weight() is None  # freed with its layer at once: no table of ours, no cycle, keeps it


def test_a_copied_layer_prepares_its_own_tensors_under_compile_and_autograd():
    layer, x = layer_and_input("llm.int8")
    layer(x)
    twin = copy.deepcopy(layer)
    assert ops.prepared_of(twin) is None and ops.owner_of(twin.weight) is twin
    x.requires_grad_()
    twin(x).sum().backward()  # through the op: the copy found as its weight's owner
    assert ops.prepared_of(twin) is not None and ops.prepared_of(twin).qweight.int8.q is twin.weight
