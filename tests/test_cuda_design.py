"""What the CUDA engine's design promises, checked on the CPU through the emulated kernels.

On a GPU, tests/test_cuda.py captures a decode step in a CUDA graph; here the same Python runs
with llmint8.cu's kernels compiled for the CPU, and a trace of every torch op it dispatches shows
what a graph capture needs and what speed needs: no op whose result the host must read (no
`.item()`, `nonzero`, boolean indexing), the same ops on the same shapes whatever the outliers,
one int8 GEMM for a whole batch, and no weight-sized tensor touched except by that GEMM.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import emulated_cuda
from llmint8_cli.core import get_method
from llmint8_cli.core import reference as R

# ops whose output shape or value the host must know: each would end a CUDA graph capture
HOST_READS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "is_nonzero", "aten.equal", "repeat_interleave")
WEIGHT_OPS = {"aten._int_mm.default", "aten.t.default"}  # the int8 GEMM (t: a view of W)


class OpTrace(TorchDispatchMode):
    """Every aten op with the shapes it read and wrote, and the addresses it read."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outputs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        self.ops.append((str(func), tuple((tuple(t.shape), t.dtype) for t in inputs + outputs), {t.data_ptr() for t in inputs}, inputs))
        return out


def traced(backend, x, prepared, method, threshold, bias):
    with OpTrace() as trace:
        y = backend.linear(x, prepared, method, threshold, bias)
    return y, trace.ops


def layer(k=96, n=80, stored=(5, 40), dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    method = get_method("llm.int8")
    qweight = R.quantize_weight(w, method, torch.tensor(stored))
    return method, qweight, torch.randn(n, generator=g).to(dtype)


def activations(batch, tokens, k, dtype, outliers, seed=1):
    """x [batch, tokens, k] with the stored columns large and `outliers` of run-time ones: none, one
    column in one sequence, or every column (through the threshold the caller picks)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, k, generator=g)
    x[..., [5, 40]] *= 15
    if outliers == "one":
        x[batch // 2, :, 17] = 30.0
    return x.to(dtype)


@pytest.mark.parametrize("batch, tokens", [(1, 1), (8, 1), (2, 40)], ids=["decode-1", "decode-8", "prefill"])
def test_the_fused_linear_runs_the_same_ops_whatever_the_outliers_and_never_reads_back(batch, tokens):
    backend = emulated_cuda()
    method, qweight, bias = layer()
    prepared = backend.prepare(qweight, method)
    traces = {}
    for outliers, threshold in (("none", 6.0), ("one", 6.0), ("all", 1e-6)):
        x = activations(batch, tokens, 96, torch.float16, outliers)
        y, traces[outliers] = traced(backend, x, prepared, method, threshold, bias)
        ref = R.linear(x, qweight, method, threshold, bias)
        assert (y.float() - ref.float()).abs().max() <= 2e-3 * max(float(ref.float().abs().max()), 1.0), outliers
        for name, _, _, inputs in traces[outliers]:
            assert not any(read in name for read in HOST_READS), f"{name} makes the host wait for the device"
            if name.startswith("aten.index"):
                assert not any(t.dtype == torch.bool for t in inputs[1:]), f"{name} with a boolean mask makes the host wait"
    shapes = {outliers: [(name, io) for name, io, _, _ in ops] for outliers, ops in traces.items()}
    assert shapes["none"] == shapes["one"] == shapes["all"], "the op sequence or a shape depends on the outliers"
    assert [name for name, _ in shapes["none"]].count("aten._int_mm.default") == 1, "one int8 GEMM for the whole batch"


def test_weight_side_tensors_are_prepared_once_and_read_only_by_the_gemm():
    """The old engine converted the 16-bit outlier weight (and, decoding, all of W to float64) at
    every call; now a call's torch ops touch no weight-side tensor but the int8 GEMM's W."""
    backend = emulated_cuda()
    method, qweight, bias = layer(k=128, n=64, stored=(5, 40), dtype=torch.bfloat16)
    prepared = backend.prepare(qweight, method)
    weight_side = {t.data_ptr(): label for label, t in (("int8 W", prepared.packed), ("stored rows", prepared.stored_rows),
                                                       ("16-bit outlier columns", qweight.outlier_weight), ("W scales", prepared.scale))}
    for batch, tokens in ((1, 1), (4, 1), (2, 24)):
        x = activations(batch, tokens, 128, torch.float32, "one")  # fp32 activations over a bf16 checkpoint: no conversion either
        _, ops = traced(backend, x, prepared, method, 6.0, bias)
        for name, _, read, _ in ops:
            touched = [weight_side[p] for p in read if p in weight_side]
            assert not touched or (name in WEIGHT_OPS and touched == ["int8 W"]), f"{name} reads {touched} at every call"


def test_a_batch_is_one_gemm_and_each_sequence_keeps_its_own_outliers():
    """Sequence 3 has a run-time outlier column; the others must not lose that column to int8's
    rounding of a 30-sized value nor gain it: each row equals the sequence run alone, bit for bit."""
    backend = emulated_cuda()
    method, qweight, bias = layer()
    prepared = backend.prepare(qweight, method)
    x = activations(8, 3, 96, torch.float32, "one")
    batched, ops = traced(backend, x, prepared, method, 6.0, bias)
    assert [name for name, *_ in ops].count("aten._int_mm.default") == 1
    for i in range(len(x)):
        assert torch.equal(batched[i], backend.linear(x[i : i + 1], prepared, method, 6.0, bias)[0]), i
