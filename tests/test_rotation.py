"""llm.int8-rotate, the eleventh method: the int8 part of LLM.int8() in a block-Hadamard basis."""

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import DATA, STORIES, needs_data, needs_stories, save_tiny, tiny_model
from llmint8_cli.backends import CpuBackend
from llmint8_cli.checkpoint.quantize import QuantizeOptions, quantize_checkpoint
from llmint8_cli.cli import app
from llmint8_cli.core import get_method
from llmint8_cli.core import reference as R
from llmint8_cli.errors import InvalidArgumentError

RUNNER = CliRunner()
ROTATE = get_method("llm.int8-rotate")
LLM_INT8 = get_method("llm.int8")


def rotation_matrix(k: int, block: int = R.ROTATION_BLOCK) -> torch.Tensor:
    return R.rotate(torch.eye(k), block)


@pytest.mark.parametrize("k,block", [(64, 64), (172, 64), (576, 64), (4096 + 20, 64), (640, 256), (4096 + 20, 256)])
def test_the_rotation_is_symmetric_orthonormal_and_block_diagonal(k, block):
    r = rotation_matrix(k, block)
    assert torch.equal(r, r.T)
    assert torch.equal(r @ r, torch.eye(k))  # exact: entries are ±2^-j
    blocks = R.rotation_blocks(k, block)
    assert sum(size for _, size in blocks) == k and all(size in (block, 64, 16, 4, 1) for _, size in blocks)
    for start, size in blocks:
        inside = r[start : start + size, start : start + size]
        assert torch.equal(inside.abs(), torch.full((size, size), size**-0.5))
        assert r[start : start + size].abs().sum() == inside.abs().sum()  # nothing outside its block
    assert R.rotation_blocks(172) == [(0, 64), (64, 64), (128, 16), (144, 16), (160, 4), (164, 4), (168, 4)]
    assert R.rotation_blocks(640, 256) == [(0, 256), (256, 256), (512, 64), (576, 64)]


@pytest.mark.parametrize("block", [0, 2, 32, 128, 4096, 64.0, True])
def test_a_rotation_block_must_be_a_power_of_4_up_to_1024(block):
    with pytest.raises(InvalidArgumentError, match="power of 4"):
        R.quantize_weight(torch.randn(8, 64), ROTATE, rotation_block=block)


def token_spikes(m=64, k=256, n=96, seed=0):
    """Activations whose large values are not tied to features: each token has one value of 3-5.5
    (below the outlier threshold) at a random feature, the rest ~0.05: what LLM.int8()'s columns
    and per-feature smoothing cannot take out, and what sets each int8 row's step."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 0.05
    x[torch.arange(m), torch.randint(0, k, (m,), generator=g)] = 3 + 2.5 * torch.rand(m, generator=g)
    return x, torch.randn(n, k, generator=g) / k**0.5


def relative_error(y, x, w):
    exact = x @ w.T
    return float((y - exact).norm() / exact.norm())


def test_rotation_removes_the_error_of_token_wise_spikes():
    x, w = token_spikes()
    plain = relative_error(R.linear(x, R.quantize_weight(w, LLM_INT8), LLM_INT8, 6.0), x, w)
    rotated = relative_error(R.linear(x, R.quantize_weight(w, ROTATE), ROTATE, 6.0), x, w)
    assert rotated < 0.4 * plain, (rotated, plain)


def test_outlier_columns_stay_in_the_original_basis():
    """Stored columns are exact W; a run-time outlier column is int8 W rotated back: W's column within int8 error."""
    x, w = token_spikes(k=172)
    x[5, 30] = 9.0  # a run-time outlier, not calibrated
    qw = R.quantize_weight(w, ROTATE, torch.tensor([7]))
    assert torch.equal(qw.outlier_weight, w[:, [7]]) and torch.equal(qw.int8.q, R.quantize_weight(w.index_fill(1, torch.tensor([7]), 0.0) @ rotation_matrix(172), LLM_INT8).int8.q)
    back = R.outlier_weight_columns(qw, torch.tensor([7, 30, 171]))
    assert torch.equal(back[:, 0], w[:, 7])
    step = float(qw.int8.scale.max())
    assert (back[:, 1:] - w[:, [30, 171]]).abs().max() < step
    y = R.linear(x, qw, ROTATE, 6.0)
    decomposed = x[:, [7, 30]] @ back[:, :2].T + (x.index_fill(1, torch.tensor([7, 30]), 0.0) @ w.index_fill(1, torch.tensor([7]), 0.0).T)
    torch.testing.assert_close(y, decomposed, rtol=0, atol=0.02)
    nan = x.clone()
    nan[3, 100] = float("nan")
    out = R.linear(nan, qw, ROTATE, 6.0)
    assert out[3].isnan().all() and not out[[0, 1, 2, 4]].isnan().any()  # the NaN column takes the 16-bit path, never a scale


def test_a_wider_block_spreads_a_large_value_thinner():
    """Token-wise values of 20-40, under a threshold of 60 so they stay in the int8 part: each adds
    v/sqrt(b) to every feature of its block, so the row's int8 step falls as b grows."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1024, generator=g) * 0.25
    x[torch.arange(64), torch.randint(0, 1024, (64,), generator=g)] = 20 + 20 * torch.rand(64, generator=g)
    w = torch.randn(96, 1024, generator=g) / 32
    errors = [relative_error(R.linear(x, R.quantize_weight(w, ROTATE, rotation_block=b), ROTATE, 60.0), x, w) for b in (16, 64, 256, 1024)]
    assert errors == sorted(errors, reverse=True) and errors[2] < 0.85 * errors[1], errors  # 0.0097 vs 0.0126


@pytest.mark.parametrize("k,block", [(172, 64), (600, 256)])
def test_the_cpu_backend_matches_the_reference_across_a_batch_with_runtime_outliers(k, block):
    x, w = token_spikes(m=40, k=k)
    x = x.reshape(4, 10, k).clone()
    x[1, 2, 50] = -8.0  # an outlier of sequence 1 only
    x[3, 0, 120] = 7.0
    qw = CpuBackend().quantize_weight(w, ROTATE, torch.tensor([7, 9]), rotation_block=block)
    assert qw.rotation_block == block
    bias = torch.randn(96)
    cpu = CpuBackend().linear(x, CpuBackend().prepare(qw, ROTATE), ROTATE, 6.0, bias)
    torch.testing.assert_close(cpu, R.linear(x, qw, ROTATE, 6.0, bias), rtol=1e-5, atol=1e-5)


def test_rotation_needs_no_calibration(tmp_path):  # planted outliers: test_smoothing.py runs both of our methods
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    result = RUNNER.invoke(app, ["quantize", str(src), str(tmp_path / "out"), "--method", "llm.int8-rotate", "--calib-samples", "0", "-q"])
    assert result.exit_code == 0, result.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert json.loads(result.stdout)["rotation_block"] == 256
    assert config["format_version"] == 4 and config["rotation"] == {"block": 256} and config["threshold"] == 60.0  # the method's defaults


@needs_stories
@needs_data
def test_a_rotated_folder_is_the_model_quantized_in_memory(tmp_path):
    """quantize -> load gives bit for bit the fp16 source rotated in memory with the same calibration (64-wide blocks: version 3)."""
    from test_smoothing import assert_folder_is_the_model_quantized_in_memory

    options = QuantizeOptions(method="llm.int8-rotate", calib_samples=4, calib_seq_len=128, calib_dataset="ptb", data_dir=str(DATA), rotation_block=64)
    out = tmp_path / "out"
    quantize_checkpoint(str(STORIES), out, options)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format_version"] == 3 and config["method"] == "llm.int8-rotate" and config["rotation"] == {"block": 64}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any(key.endswith(".input_smooth") for key in f.keys())
    assert_folder_is_the_model_quantized_in_memory(out, options, tmp_path)
    config_path = out / "config.json"  # a version-1 reader must never take rotated weights for plain ones
    document = json.loads(config_path.read_text())
    document["quantization_config"]["format_version"] = 1
    config_path.write_text(json.dumps(document))
    result = RUNNER.invoke(app, ["eval-ppl", str(out), "--no-verify", "-q"])
    assert result.exit_code == 2 and "needs format_version 3" in result.stderr


@pytest.mark.parametrize("block", [64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_native_activation_kernel_gives_the_references_bits(dtype, block):
    from llmint8_cli.backends.cpu_kernels import native_kernels

    native = native_kernels()
    if native is None:
        pytest.skip("native CPU kernels unavailable")
    g = torch.Generator().manual_seed(0)
    for k in (1, 5, 172, 576, 4096 + 20):
        x = (torch.randn(6, k, generator=g) * torch.rand(6, 1, generator=g) * 4).to(dtype)
        x[1, k // 2] = 9.0  # an outlier of the first sequence only
        stored = torch.rand(k, generator=g) < 0.05
        q, scale, masks, runtime_only = native.quantize_rotated_sequences(x, stored, 6.0, 2, block)
        assert runtime_only == int((masks > stored).sum()) >= 1, k
        for s in range(2):
            ref, fp_idx = R.quantize_activations(x[3 * s : 3 * s + 3], ROTATE, 6.0, torch.nonzero(stored).flatten(), rotation_block=block)
            assert torch.equal(torch.nonzero(masks[s]).flatten(), fp_idx), (k, s)
            assert torch.equal(q[3 * s : 3 * s + 3], ref.q) and torch.equal(scale[3 * s : 3 * s + 3], ref.scale), (k, s)


@needs_stories
@needs_data
def test_a_folder_with_256_wide_blocks_is_the_model_quantized_in_memory(tmp_path):
    """The default 256-wide block is stored (format 4, which version-3 readers refuse) and read back."""
    from test_smoothing import assert_folder_is_the_model_quantized_in_memory

    from llmint8_cli.checkpoint.load import load

    out = tmp_path / "out"
    result = RUNNER.invoke(app, ["quantize", str(STORIES), str(out), "--method", "llm.int8-rotate", "--calib-samples", "4",
                                 "--calib-seq-len", "128", "--calib-dataset", "ptb", "--data-dir", str(DATA), "-q"])
    assert result.exit_code == 0, result.stderr
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format_version"] == 4 and config["rotation"] == {"block": 256}
    assert {m.rotation_block for m in load(out).modules() if hasattr(m, "rotation_block")} == {256}
    options = QuantizeOptions(method="llm.int8-rotate", calib_samples=4, calib_seq_len=128, calib_dataset="ptb", data_dir=str(DATA), rotation_block=256)
    assert_folder_is_the_model_quantized_in_memory(out, options, tmp_path)
    document = json.loads((out / "config.json").read_text())
    document["quantization_config"]["format_version"] = 3  # a version-3 reader would rotate in 64-wide blocks
    (out / "config.json").write_text(json.dumps(document))
    result = RUNNER.invoke(app, ["eval-ppl", str(out), "--no-verify", "-q"])
    assert result.exit_code == 2 and "needs format_version 4" in result.stderr


def test_a_bad_rotation_block_is_one_line_and_writes_nothing(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    result = RUNNER.invoke(app, ["quantize", str(src), str(tmp_path / "out"), "--method", "llm.int8-rotate", "--rotation-block", "128", "--calib-samples", "0", "-q"])
    assert result.exit_code == 2 and "power of 4" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@needs_stories
@needs_data
def test_the_rotation_block_keys_the_cache_and_is_in_the_json(tmp_path):
    args = ["eval-ppl", str(STORIES), "--dataset", "ptb", "--seq-len", "128", "--max-tokens", "256", "--data-dir", str(DATA),
            "--methods", "llm.int8-rotate", "--calib-samples", "0", "--cache-dir", str(tmp_path), "-q"]
    for block in (64, 256):
        result = RUNNER.invoke(app, [*args, "--rotation-block", str(block)])
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["results"]["llm.int8-rotate"]["rotation_block"] == block
    folders = sorted(p.name for p in next(tmp_path.iterdir()).iterdir())
    assert folders == ["fp16-float32-cpu", "llm.int8-rotate-t60-float32-cpu", "llm.int8-rotate-t60-r256-float32-cpu"]  # 64 predates the block in names


def test_bench_times_the_rotation_at_the_block_asked_for():
    result = RUNNER.invoke(app, ["bench", "--shapes", "64x512", "--tokens", "2", "--outlier-cols", "2", "--rotation-block", "64", "--repeat", "1", "-q"])
    assert result.exit_code == 0, result.stderr
    names = [row["row"] for row in json.loads(result.stdout)["rows"]]
    assert "llm.int8-rotate (2 outliers, 64-wide blocks)" in names and "llm.int8 (2 outliers)" in names
