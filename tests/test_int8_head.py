"""--int8-head (issue #52): the LM head in int8 as an opt-in, for generate, bench and eval-ppl."""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import STORIES, needs_stories, save_tiny, tiny_config, tiny_model, tiny_tokenizer
from llmint8_cli import Int8Linear, quantize_model
from llmint8_cli.cli import app
from llmint8_cli.errors import InvalidArgumentError
from llmint8_cli.nn.convert import quantize_head

RUNNER = CliRunner()


def tied_tiny():
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_a_tied_head_gets_int8_rows_of_its_own_and_the_embeddings_stay_16_bit():
    model = quantize_model(tied_tiny(), "llm.int8")
    embeddings = model.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(4, 128, (2, 12))
    with torch.no_grad():
        sixteen_bit_head = model(ids).logits
    quantize_head(model)
    head = model.get_output_embeddings()
    assert isinstance(head, Int8Linear) and head.weight.dtype == torch.int8 and head.method.name == "llm.int8" and head.threshold == 6.0
    assert model.model.embed_tokens.weight.dtype == torch.float32 and torch.equal(model.model.embed_tokens.weight, embeddings)
    model.tie_weights()  # as transformers may call it: the int8 head stays
    assert model.get_output_embeddings() is head
    with torch.no_grad():
        int8_head = model(ids).logits
    error = (int8_head - sixteen_bit_head).norm() / sixteen_bit_head.norm()
    assert 0 < error < 0.02  # vector-wise int8 rows of a random head: well under 2 %, and not the 16-bit head itself


@needs_stories
def test_the_int8_head_of_a_real_model_keeps_its_predictions():
    """stories260K quantized with llm.int8: the int8 head moves the logits by about a percent and keeps the greedy choices."""
    import llmint8_cli
    from llmint8_cli import models

    model = quantize_model(models.load_model(models.ModelSource("folder", str(STORIES)), dtype=torch.float32), "llm.int8")
    ids = torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        after = quantize_head(model)(ids).logits
    assert isinstance(model.lm_head, Int8Linear) and llmint8_cli is not None
    assert (after - before).norm() / before.norm() < 0.02
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.97


def test_an_int8_head_is_refused_where_it_cannot_be(tmp_path):
    with pytest.raises(InvalidArgumentError, match="no int8 method"):
        quantize_head(tiny_model("llama"))
    folder = save_tiny(tiny_model("llama", outlier_scale=40.0), tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(folder)
    for command in (["bench", "--int8-head"], ["bench", str(folder), "--method", "fp16", "--int8-head", "--no-peers", "--prompt-tokens", "8"],
                    ["generate", str(folder), "Once", "--int8-head", "--device-map", "auto"],
                    ["eval-ppl", str(folder), "--methods", "llm.int8-smooth", "--int8-head", "--calib-samples", "1", "--dataset", str(tmp_path / "t.txt")]):
        (tmp_path / "t.txt").write_text("Once upon a time there was a dog. " * 40)
        result = RUNNER.invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("llmint8: error: --int8-head"), (command, result.stderr)


def test_eval_ppl_with_an_int8_head_reports_it_and_keeps_its_windows_apart(tmp_path):
    folder = save_tiny(tiny_model("llama", outlier_scale=40.0), tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(folder)
    (tmp_path / "t.txt").write_text("Once upon a time there was a little dog named Spot who liked the park. " * 30)
    common = ["eval-ppl", str(folder), "--dataset", str(tmp_path / "t.txt"), "--seq-len", "64", "--cache-dir", str(tmp_path / "cache"), "-q"]
    plain, head, again = (RUNNER.invoke(app, common + extra) for extra in ([], ["--int8-head"], ["--int8-head"]))
    assert plain.exit_code == head.exit_code == again.exit_code == 0, head.output
    plain, head, again = (json.loads(r.stdout)["results"] for r in (plain, head, again))
    assert "int8_head" not in plain["llm.int8"] and head["llm.int8"]["int8_head"] is True and "int8_head" not in head["fp16"]
    assert head["llm.int8"]["reused_windows"] == 0 and again["llm.int8"]["reused_windows"] > 0  # its own cached windows, not the 16-bit head's
    assert head["llm.int8"]["ppl"] != plain["llm.int8"]["ppl"] and again["llm.int8"]["ppl"] == head["llm.int8"]["ppl"]


def test_bench_times_the_int8_model_again_with_an_int8_head(tmp_path):
    folder = save_tiny(tiny_model("llama", outlier_scale=40.0), tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(folder)
    result = RUNNER.invoke(app, ["bench", str(folder), "--int8-head", "--no-peers", "--compile", "off", "--prompt-tokens", "8", "--batch", "1",
                                 "--new-tokens", "4", "--repeat", "1", "-q"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert list(rows)[-1] == "llm.int8 + int8 head" and {"llm.int8", "llm.int8 + int8 head"} <= set(rows)
    head_row, plain_row = rows["llm.int8 + int8 head"], rows["llm.int8"]
    assert head_row["decode_step"]["int8_linear_calls"] == plain_row["decode_step"]["int8_linear_calls"] + 1
    assert head_row["decode_step"]["head_gb_per_s"] > 0 and head_row["decode"]["1"]["tokens_per_s"] > 0
