"""CUDA-only checks (skipped without a GPU and CuPy); the parity suite covers the ops themselves."""


import pytest
import torch

from llmint8_cli.backends import cuda

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not cuda.is_available(), reason="needs an NVIDIA GPU with CuPy")]


def test_int8_gemm_is_exact():
    g = torch.Generator().manual_seed(0)
    for m, k, n in [(32, 64, 48), (512, 4096, 4096), (17, 4096, 1024), (1, 4096, 1024), (16, 64, 48), (3, 40, 5)]:
        a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        got = cuda.CudaBackend().int8_gemm(a.cuda(), w.cuda()).cpu()
        assert torch.equal(got.long(), a.long() @ w.long().T), (m, k, n)


def int8_layer(k=1024, n=512):
    from llmint8_cli import Int8Linear

    torch.manual_seed(0)
    return Int8Linear.from_linear(torch.nn.Linear(k, n).half(), outlier_idx=torch.tensor([3, 9])).cuda()


def test_fused_linear_never_synchronises_with_the_host():
    layer = int8_layer()
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


@pytest.mark.parametrize("batch", [1, 8])
def test_a_decode_step_is_captured_in_a_cuda_graph_and_replayed(batch):
    """Two int8 layers of an MLP, one token per sequence: captured once, then replayed on new
    tokens with no outlier, a run-time outlier in one sequence, and every column an outlier of
    one sequence; each replay gives the eager call's bits."""
    up, down = int8_layer(1024, 512), int8_layer(512, 1024)

    def step(x):
        return down(torch.nn.functional.gelu(up(x)))

    static_x = torch.randn(batch, 1, 1024, device="cuda", dtype=torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: compile the kernels, prepare the weights
        for _ in range(2):
            step(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step(static_x)
    for case in ("none", "one", "wide"):
        x = torch.randn(batch, 1, 1024, device="cuda", dtype=torch.float16)
        if case == "one":
            x[batch // 2, 0, 17] = 30.0
        if case == "wide":
            x[-1] *= 40.0  # |x| >= 6 in most columns of the last sequence
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, step(x)), case
