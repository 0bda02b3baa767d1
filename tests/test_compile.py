"""--compile (issue #52, part 2): the CPU's row-wise linear as one native torch op inside compiled
graphs, compiled decoding equal to eager decoding through the same static cache, and the fallbacks."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import save_tiny, tiny_model, tiny_tokenizer
from llmint8_cli import Int8Linear, compilation, ops, quantize_model
from llmint8_cli.backends import cpu_kernels
from llmint8_cli.cli import app
from llmint8_cli.errors import InvalidArgumentError

RUNNER = CliRunner()
needs_native = pytest.mark.skipif(cpu_kernels.native_kernels() is None or not cpu_kernels.PATHS["llmint8-avx2"].available(),
                                  reason="no native AVX2 kernels here")


def quantized_tiny(dtype: torch.dtype = torch.bfloat16):
    model = tiny_model("llama", outlier_scale=40.0).to(dtype)
    return quantize_model(model, "llm.int8").eval()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [False, True])
@pytest.mark.parametrize("product", ["own tile", "oneDNN on W as stored", "oneDNN on a [k, n] copy"])
def test_the_native_linear_op_passes_opcheck(dtype, smoothing, product):
    """llmint8_cpu::rowwise_linear: its schema, the fake (meta) shape compilers trace with, and the
    dispatcher's checks, on a decoded batch of 2 sequences with stored and run-time outliers, with
    each product it runs; its output is the layer's."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).to(dtype)
    smooth = {"input_max": torch.rand(64) * 4 + 0.5} if smoothing else {}
    layer = Int8Linear.from_linear(linear, "llm.int8-smooth" if smoothing else "llm.int8", outlier_idx=torch.tensor([3, 10]), **smooth)
    x = torch.randn(2, 64).to(dtype)
    x[1, 7] = 30.0
    layer(x[:, None])  # prepares the weight
    state = ops.prepared_of(layer)
    w_kn, onednn = {"own tile": (None, False), "oneDNN on W as stored": (None, True), "oneDNN on a [k, n] copy": (layer.weight.t().contiguous(), True)}[product]
    arguments = (x, layer.weight, layer.weight_scale, state.stored_mask, state.stored_rows, state.stored_pos, layer.bias, None,
                 layer.input_smooth, 6.0, 2, w_kn, onednn)
    torch.library.opcheck(torch.ops.llmint8_cpu.rowwise_linear.default, arguments)
    assert torch.equal(torch.ops.llmint8_cpu.rowwise_linear(*arguments), layer(x[:, None])[:, 0])


@needs_native
def test_a_compiled_decode_step_calls_the_native_op_and_gives_the_eager_logits(monkeypatch):
    """Each Int8Linear of a one-token step is one llmint8_cpu::rowwise_linear node (no Python op in
    between), and compiled greedy decoding gives eager's tokens and logits bit for bit (bf16: Inductor
    rounds intermediates as eager does) through the same static cache."""
    monkeypatch.setenv(cpu_kernels.FORCE_ENV, "llmint8-avx2")  # the path that runs a decoded token in one call on any CPU
    model = quantized_tiny()
    compilation.prepare_layers(model)
    layers = sum(isinstance(m, Int8Linear) for m in model.modules())
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=16)
    torch._dynamo.reset()
    with torch.inference_mode():
        explanation = torch._dynamo.explain(model)(input_ids=torch.tensor([[5]]), cache=cache, cache_position=torch.tensor([0]))
    code = explanation.graphs[0].code
    assert explanation.graph_break_count == 0 and code.count("llmint8_cpu.rowwise_linear") == layers and "llmint8.int8_linear" not in code
    ids = torch.randint(4, 100, (2, 6))
    settings = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "pad_token_id": 0, "output_logits": True, "return_dict_in_generate": True}
    with torch.inference_mode():
        eager = model.generate(ids, cache_implementation="static", disable_compile=True, **settings)
        compiled = model.generate(ids, **compilation.generate_options(model), **settings)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert all(torch.equal(a, b) for a, b in zip(compiled.logits, eager.logits))


@needs_native
@pytest.mark.parametrize("path", ["onednn-nk", "onednn-kn"])
def test_a_compiled_prompt_runs_each_layer_as_one_native_op_with_onednns_product(monkeypatch, path):
    """A prompt's rows (more than a decoded batch) through a plan's oneDNN product: each Int8Linear is one
    llmint8_cpu::rowwise_linear node holding W's [k, n] layout, and the logits are eager's bit for bit."""
    if not cpu_kernels.PATHS[path].available():
        pytest.skip(f"{path} is not exact here")
    monkeypatch.setenv(cpu_kernels.FORCE_ENV, path)
    model = quantized_tiny()
    compilation.prepare_layers(model)
    layers = sum(isinstance(m, Int8Linear) for m in model.modules())
    ids = torch.randint(4, 100, (2, 24))
    torch._dynamo.reset()
    with torch.inference_mode():
        explanation = torch._dynamo.explain(model)(input_ids=ids, use_cache=False)
        graph = explanation.graphs[0]
        assert explanation.graph_break_count == 0 and graph.code.count("llmint8_cpu.rowwise_linear") == layers and "llmint8.int8_linear" not in graph.code
        # W reaches the op as held (a view of it, W.t(), would be copied into a buffer at every call of the compiled code)
        weights = [node.args[1:2] + node.args[11:12] for node in graph.graph.nodes if "rowwise_linear" in str(node.target)]
        assert all(arg is None or arg.op in ("get_attr", "placeholder") for args in weights for arg in args)
        eager = model(input_ids=ids, use_cache=False).logits
        torch._dynamo.reset()
        compiled = compilation.compiled_forward(model)(input_ids=ids, use_cache=False).logits
    assert torch.equal(compiled, eager)


def test_compiling_where_inductor_cannot_is_one_line_under_on_and_a_note_under_auto(tmp_path):
    folder = save_tiny(tiny_model("llama", outlier_scale=40.0), tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(folder)
    with torch._inductor.config.patch({"cpp.cxx": ("llmint8-no-such-compiler",)}):  # (monkeypatch cannot restore torch's config attributes)
        notes = []
        assert not compilation.decide("auto", torch.device("cpu"), True, notes) and "C++ compiler" in notes[0]
        assert not compilation.decide("auto", torch.device("cpu"), False, [])  # too short to compile: no note either
        for command in (["generate", folder, "Once", "--compile", "on"], ["bench", folder, "--compile", "on", "--no-peers"]):
            result = RUNNER.invoke(app, [*map(str, command)])
            assert result.exit_code == 2, result.output
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("llmint8: error: --compile on: Inductor needs a C++ compiler"), result.stderr
    result = RUNNER.invoke(app, ["generate", str(folder), "Once", "--compile", "sometimes"])
    assert result.exit_code == 2 and "--compile: expected auto, on or off" in result.stderr


def test_a_model_that_cannot_be_compiled_runs_eager_under_auto_and_is_refused_under_on():
    """A graph break in a fullgraph compile: auto notes it and decodes eager (the eager tokens), on is one line."""
    model = quantized_tiny()
    model.model.layers[0].register_forward_pre_hook(lambda module, args: torch._dynamo.graph_break())
    ids = torch.randint(4, 100, (1, 5))

    def run(compiling: bool):
        options = compilation.generate_options(model) if compiling else {}
        with torch.inference_mode():
            return model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, **options)

    notes = []
    torch._dynamo.reset()
    assert torch.equal(compilation.run_or_fall_back(run, True, "auto", notes), run(False))
    assert len(notes) == 1 and notes[0].startswith("--compile auto: running eager, the model cannot be compiled"), notes
    torch._dynamo.reset()
    with pytest.raises(InvalidArgumentError, match="--compile on: the model cannot be compiled"):
        compilation.run_or_fall_back(run, True, "on", [])


def test_bench_compiles_both_rows_and_reports_their_compile_seconds(tmp_path):
    folder = save_tiny(tiny_model("llama", outlier_scale=40.0), tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(folder)
    result = RUNNER.invoke(app, ["bench", str(folder), "--compile", "on", "--no-peers", "--prompt-tokens", "8", "--batch", "1", "--new-tokens", "4",
                                 "--repeat", "1", "--dtype", "bf16", "-q"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["compile"] == "on" and any(Path(document["inductor_cache"]).iterdir())  # Inductor wrote its cache where the JSON says
    assert set(document["results"]) == {"bf16", "llm.int8"}
    for row in document["results"].values():
        assert row["compiled"] is True and set(row["compile_s"]) == {"prefill 8", "decode 1"} and all(s > 0 for s in row["compile_s"].values())
