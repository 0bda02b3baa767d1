"""CUDA-only checks (skipped without a GPU and CuPy); the parity suite covers the ops themselves."""


import pytest
import torch

from llmint8_cli.backends import cuda

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not cuda.is_available(), reason="needs an NVIDIA GPU with CuPy")]


@pytest.mark.parametrize("gemm", ["wmma", "cublaslt"])
def test_int8_gemm_is_exact(gemm, monkeypatch):
    monkeypatch.setenv("LLMINT8_CUDA_GEMM", gemm)
    g = torch.Generator().manual_seed(0)
    for m, k, n in [(32, 64, 48), (512, 4096, 4096), (17, 4096, 1024), (3, 40, 5)]:
        a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        got = cuda.CudaBackend().int8_gemm(a.cuda(), w.cuda()).cpu()
        assert torch.equal(got.long(), a.long() @ w.long().T), (gemm, m, k, n)


def test_fused_linear_never_synchronises_with_the_host():
    from llmint8_cli import Int8Linear

    layer = Int8Linear.from_linear(torch.nn.Linear(1024, 512).half(), outlier_idx=torch.tensor([3, 9])).cuda()
    x = torch.randn(64, 1024, device="cuda", dtype=torch.float16)
    x[:, 100] = 20.0
    layer(x)  # first call prepares the weight (may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference = torch.nn.functional.linear(x.float(), layer.quantized_weight().int8.q.float() * layer.weight_scale[:, None])
    assert torch.isfinite(y).all() and y.shape == (64, 512)
    assert (y.float() - reference - layer.bias.float()).abs().max() < 0.5
