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

RUNNER = CliRunner()
ROTATE = get_method("llm.int8-rotate")
LLM_INT8 = get_method("llm.int8")


def rotation_matrix(k: int) -> torch.Tensor:
    return R.rotate(torch.eye(k))


@pytest.mark.parametrize("k", [64, 172, 576, 4096 + 20])
def test_the_rotation_is_symmetric_orthonormal_and_block_diagonal(k):
    r = rotation_matrix(k)
    assert torch.equal(r, r.T)
    assert torch.equal(r @ r, torch.eye(k))  # exact: entries are ±2^-j
    blocks = R.rotation_blocks(k)
    assert sum(size for _, size in blocks) == k and all(size in (64, 16, 4, 1) for _, size in blocks)
    for start, size in blocks:
        inside = r[start : start + size, start : start + size]
        assert torch.equal(inside.abs(), torch.full((size, size), size**-0.5))
        assert r[start : start + size].abs().sum() == inside.abs().sum()  # nothing outside its block
    assert R.rotation_blocks(172) == [(0, 64), (64, 64), (128, 16), (144, 16), (160, 4), (164, 4), (168, 4)]


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


def test_the_cpu_backend_matches_the_reference_across_a_batch_with_runtime_outliers():
    x, w = token_spikes(m=40, k=172)
    x = x.reshape(4, 10, 172).clone()
    x[1, 2, 50] = -8.0  # an outlier of sequence 1 only
    x[3, 0, 120] = 7.0
    qw = CpuBackend().quantize_weight(w, ROTATE, torch.tensor([7, 9]))
    bias = torch.randn(96)
    cpu = CpuBackend().linear(x, CpuBackend().prepare(qw, ROTATE), ROTATE, 6.0, bias)
    torch.testing.assert_close(cpu, R.linear(x, qw, ROTATE, 6.0, bias), rtol=1e-5, atol=1e-5)


def test_rotation_needs_no_calibration(tmp_path):  # planted outliers: test_smoothing.py runs both of our methods
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    result = RUNNER.invoke(app, ["quantize", str(src), str(tmp_path / "out"), "--method", "llm.int8-rotate", "--calib-samples", "0", "-q"])
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["format_version"] == 3


@needs_stories
@needs_data
def test_a_rotated_folder_is_the_model_quantized_in_memory(tmp_path):
    """quantize -> load gives bit for bit the fp16 source rotated in memory with the same calibration."""
    from test_smoothing import assert_folder_is_the_model_quantized_in_memory

    options = QuantizeOptions(method="llm.int8-rotate", calib_samples=4, calib_seq_len=128, calib_dataset="ptb", data_dir=str(DATA))
    out = tmp_path / "out"
    quantize_checkpoint(str(STORIES), out, options)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format_version"] == 3 and config["method"] == "llm.int8-rotate"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any(key.endswith(".input_smooth") for key in f.keys())
    assert_folder_is_the_model_quantized_in_memory(out, options, tmp_path)
    config_path = out / "config.json"  # a version-1 reader must never take rotated weights for plain ones
    document = json.loads(config_path.read_text())
    document["quantization_config"]["format_version"] = 1
    config_path.write_text(json.dumps(document))
    result = RUNNER.invoke(app, ["eval-ppl", str(out), "--no-verify", "-q"])
    assert result.exit_code == 2 and "needs format_version 3" in result.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_native_activation_kernel_gives_the_references_bits(dtype):
    from llmint8_cli.backends.cpu_kernels import native_kernels

    native = native_kernels()
    if native is None:
        pytest.skip("native CPU kernels unavailable")
    g = torch.Generator().manual_seed(0)
    for k in (1, 5, 172, 576, 4096 + 20):
        x = (torch.randn(6, k, generator=g) * torch.rand(6, 1, generator=g) * 4).to(dtype)
        x[1, k // 2] = 9.0  # an outlier of the first sequence only
        stored = torch.rand(k, generator=g) < 0.05
        q, scale, masks, runtime_only = native.quantize_rotated_sequences(x, stored, 6.0, 2, R.ROTATION_BLOCK)
        assert runtime_only == int((masks > stored).sum()) >= 1, k
        for s in range(2):
            ref, fp_idx = R.quantize_activations(x[3 * s : 3 * s + 3], ROTATE, 6.0, torch.nonzero(stored).flatten())
            assert torch.equal(torch.nonzero(masks[s]).flatten(), fp_idx), (k, s)
            assert torch.equal(q[3 * s : 3 * s + 3], ref.q) and torch.equal(scale[3 * s : 3 * s + 3], ref.scale), (k, s)
