"""Every available backend against the reference, op by op (after llama.cpp's test-backend-ops).

int8 values, scales, zero points, the 16-bit column set and the int32 accumulations must match
exactly; outputs must match within TOLERANCE x (output magnitude) for the output dtype.
A CUDA backend joins automatically when CuPy and a GPU are present; without one its kernels run
too, compiled for the CPU with CUDA's semantics emulated ("cuda-emulated"). The CPU backend runs once
per int8 GEMM path this machine can run (forced in turn), so a path stays tested where the
measured choice would not pick it.
"""

import dataclasses
import json
import sys

import pytest
import torch

from llmint8_cli.backends import available_backends, cpu_kernels
from llmint8_cli.backends.cuda import CudaBackend
from llmint8_cli.core import METHODS, get_method
from llmint8_cli.core import reference as R

from conftest import emulated_cuda

BACKENDS = [b for b in available_backends() if b.name != "reference"]
QUANTIZED = [name for name, m in METHODS.items() if m.quantized]
# (leading dims, k, n): a single token, odd widths (172 like stories260K's FFN, 1), 3-D inputs
SHAPES = [((1,), 1, 1), ((1,), 172, 64), ((7,), 33, 5), ((2, 8), 64, 172), ((3, 5), 256, 96), ((17,), 40, 1)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PATTERNS = ["none", "runtime", "stored", "stored+runtime", "nonfinite"]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CPU_PATHS = [name for name, path in cpu_kernels.PATHS.items() if path.available()]
EMULATED = "cuda-emulated"  # the CUDA backend's kernels on the CPU, built when first asked for
BACKEND_PATHS = [(b, name) for b in BACKENDS for name in (CPU_PATHS if b.name == "cpu" else [None])] + [(EMULATED, None)]


@pytest.fixture(params=BACKEND_PATHS, ids=lambda p: getattr(p[0], "name", p[0]) + (f"-{p[1]}" if p[1] else ""))
def backend(request, monkeypatch):
    """A backend, with the CPU's GEMM path forced through LLMINT8_CPU_GEMM."""
    chosen, gemm = request.param
    if gemm:
        monkeypatch.setenv(cpu_kernels.FORCE_ENV, gemm)
    return emulated_cuda() if chosen == EMULATED else chosen


def make_case(lead, k, n, dtype, pattern, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    bias = torch.randn(n, generator=g).to(dtype)
    stored = None
    if "runtime" in pattern:
        x[..., (k - 1) // 2] *= 20  # a run-time outlier feature
    if "stored" in pattern:
        stored = torch.tensor(sorted({0, k // 3}))
        x[..., stored] *= 15
    if pattern == "nonfinite":
        x.view(-1, k)[0, k - 1] = float("nan")
        x.view(-1, k)[-1, 0] = float("inf")
    return x.to(dtype), w.to(dtype), bias, stored


def quantized(w, method, stored, x):
    """W for a method; a smoothing method's m calibrated on x's column ranges (alpha 0.5)."""
    if not method.smoothing:
        return R.quantize_weight(w, method, stored)
    idx = R.stored_outlier_index(w, method, stored)
    ranges = torch.nan_to_num(x.reshape(-1, x.shape[-1]).float().abs(), posinf=0.0, nan=0.0).amax(dim=0)
    return R.quantize_weight(w, method, stored, R.smoothing_factors(ranges, w, 0.5, idx))


@pytest.mark.parametrize("method_name", QUANTIZED)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_backend_matches_reference(backend, method_name, pattern):
    """Every op; with the run-time outlier, also every column an outlier (a tiny threshold)."""
    assert_matches_reference(backend, method_name, pattern, SHAPES, (6.0, 1.5, 1e-6) if pattern == "runtime" else (6.0, 1.5))


def test_the_cuda_int8_gemm_is_exact_for_every_row_count():
    """A decode step's few rows (padded to 32 for cuBLASLt), odd widths (float64), no rows."""
    backend, g = CudaBackend(), torch.Generator().manual_seed(0)
    for m, k, n in [(1, 64, 48), (16, 64, 48), (17, 64, 48), (32, 64, 48), (16, 16, 16), (48, 32, 16), (5, 33, 8), (0, 64, 8)]:
        a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        assert torch.equal(backend.int8_gemm(a, w).long(), a.long() @ w.long().T), (m, k, n)


def assert_matches_reference(backend, method_name, pattern, shapes, thresholds):
    method = get_method(method_name)
    for case, (lead, k, n) in enumerate(shapes):
        for threshold in thresholds:
            for dtype in DTYPES:
                x, w, bias, stored = make_case(lead, k, n, dtype, pattern, seed=case)
                qweight = quantized(w, method, stored, x)
                prepared = backend.prepare(qweight, method)
                x2 = R.smooth_activations(x.reshape(-1, k), qweight.smooth)
                groups = R.sequence_count(x)
                ref_q, ref_cols = R.quantize_activations(x2, method, threshold, qweight.outlier_idx, groups)
                got_q, got_cols = backend.quantize_activations(x2, method, threshold, qweight.outlier_idx, groups)
                where = f"{method_name} {pattern} {lead}x{k}->{n} {dtype} t={threshold}"
                assert torch.equal(got_cols, ref_cols), where
                assert torch.equal(got_q.q, ref_q.q), where
                assert torch.equal(got_q.scale, ref_q.scale), where
                assert (got_q.zero is None) == (ref_q.zero is None) and (ref_q.zero is None or torch.equal(got_q.zero, ref_q.zero)), where
                assert torch.equal(backend.int8_accumulate(got_q, prepared), R.int8_accumulate(ref_q, qweight.int8)), where
                for b in (None, bias):
                    ref = R.linear(x, qweight, method, threshold, b)
                    got = backend.linear(x, prepared, method, threshold, b)
                    assert got.dtype == x.dtype and got.shape == (*lead, n), where
                    finite = torch.isfinite(ref)
                    assert torch.equal(finite, torch.isfinite(got)), where
                    scale = ref[finite].float().abs().max() if finite.any() else torch.tensor(1.0)
                    err = (got[finite].float() - ref[finite].float()).abs().max() if finite.any() else torch.tensor(0.0)
                    assert err <= TOLERANCE[dtype] * max(float(scale), 1.0), f"{where}: {err} vs {scale}"


def test_parity_suite_covers_a_real_backend():
    assert any(b.name == "cpu" for b in BACKENDS)


def test_int8_accumulation_is_exact_at_the_int8_extremes(backend):
    """-127 x -127 over k = 4096 sums to 66,064,384: no saturation in any backend path."""
    k = 4096
    q = R.Quantized(torch.full((3, k), -127, dtype=torch.int8), torch.ones(3), None)
    qweight = R.QuantizedWeight(R.Quantized(torch.full((5, k), -127, dtype=torch.int8), torch.ones(5), None), torch.zeros(0, dtype=torch.long), torch.zeros(5, 0))
    acc = backend.int8_accumulate(q, backend.prepare(qweight, get_method("llm.int8")))
    assert torch.all(acc == 127 * 127 * k)


@pytest.mark.parametrize("method_name", QUANTIZED)
def test_quantize_weight_matches_reference(backend, method_name):
    from llmint8_cli.errors import InvalidWeightError

    method = get_method(method_name)
    for case, (_, k, n) in enumerate(SHAPES):
        for dtype in DTYPES:
            for stored in (None, torch.tensor(sorted({0, k // 3}))):
                x, w, _, _ = make_case((1,), k, n, dtype, "none", seed=case)
                ref = quantized(w, method, stored, x)
                got = backend.quantize_weight(w, method, stored, ref.smooth)
                where = f"{method_name} {k}->{n} {dtype} stored={stored}"
                assert torch.equal(got.int8.q, ref.int8.q) and torch.equal(got.int8.scale, ref.int8.scale), where
                assert (ref.int8.zero is None) == (got.int8.zero is None), where
                assert torch.equal(got.outlier_idx, ref.outlier_idx) and torch.equal(got.outlier_weight, ref.outlier_weight), where
        bad = torch.randn(n, k)
        bad[n // 2, k // 2] = float("nan")
        with pytest.raises(InvalidWeightError, match="NaN or Inf"):
            backend.quantize_weight(bad, method, smooth=torch.ones(k) if method.smoothing else None)


@pytest.mark.parametrize("method_name", ["llm.int8", "rowwise+decomp", "llm.int8-smooth", "llm.int8-rotate"])
def test_a_sequence_gets_the_same_bits_alone_or_in_a_batch(backend, method_name):
    """Sequences in a batch have different outlier columns (threshold 1.5); none may change another's output."""
    method = get_method(method_name)
    x, w, bias, stored = make_case((4, 9), 96, 80, torch.float32, "stored+runtime", seed=3)
    prepared = backend.prepare(quantized(w, method, stored, x), method)
    batched = backend.linear(x, prepared, method, 1.5, bias)
    for i in range(len(x)):
        assert torch.equal(batched[i], backend.linear(x[i : i + 1], prepared, method, 1.5, bias)[0]), i


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k, n, columns, batch", [(96, 80, 12, 8), (256, 640, 128, 64)])  # the second: a heavy 16-bit part, split over columns when alone
def test_decoding_a_batch_with_many_stored_columns(backend, dtype, k, n, columns, batch):
    """Sequences of one token with more stored columns than the epilogue's own loop takes at full
    length (the CPU multiplies them in runs of sequences that share them, and splits a lone
    sequence's columns over threads where the work is heavy): each matches the reference, and gets
    the same bits alone as in the batch, also where one sequence has a run-time column of its own
    and breaks the run."""
    method = get_method("llm.int8")
    g = torch.Generator().manual_seed(11)
    stored = torch.arange(columns) * (k // columns)
    x = torch.randn(batch, 1, k, generator=g)
    x[..., stored] *= 15
    x[5, :, 3] = 30.0  # a run-time outlier column in one sequence only
    x, w, bias = x.to(dtype), (torch.randn(n, k, generator=g) / k**0.5).to(dtype), torch.randn(n, generator=g).to(dtype)
    qweight = quantized(w, method, stored, x)
    prepared = backend.prepare(qweight, method)
    batched = backend.linear(x, prepared, method, 6.0, bias)
    ref = R.linear(x, qweight, method, 6.0, bias)
    err = (batched.float() - ref.float()).abs().max()
    assert err <= TOLERANCE[dtype] * max(float(ref.float().abs().max()), 1.0), err
    for i in range(len(x)):
        assert torch.equal(batched[i], backend.linear(x[i : i + 1], prepared, method, 6.0, bias)[0]), i


@pytest.mark.parametrize("name", CPU_PATHS)
def test_every_cpu_gemm_path_gives_the_int32_sums(name):
    """Sums beyond 2^24: an int32 path is exact, the float32 path equals float(int32) bit for bit."""
    path = cpu_kernels.PATHS[name]
    g = torch.Generator().manual_seed(0)
    w = torch.randint(90, 128, (48, 8192), dtype=torch.int8, generator=g)
    w[::2] *= -1
    a = torch.randint(90, 128, (5, 8192), dtype=torch.int8, generator=g)
    exact = (a.long() @ w.long().t())
    assert exact.abs().max() > 2**24
    got = path.run(a, path.pack(w))
    assert got.dtype == (torch.int32 if path.int32 else torch.float32)
    assert torch.equal(got, exact.int()) if path.int32 else torch.equal(got, exact.int().float())


@pytest.mark.skipif(cpu_kernels.native_kernels() is None, reason="no compiler for the native CPU kernels")
@pytest.mark.parametrize("vnni", [False, True])
def test_both_native_tiles_give_the_int32_sums(vnni):
    """The AVX2 tile and, where the CPU has it, the AVX512-VNNI one: the extremes, k with tails of
    every kind (1, 33, 65 bytes past a 64-byte step) and sums beyond 2^24; m from 1 to 16 rows
    (the VNNI tiles of 8 and 4 rows, then pairs, then one) with n past each tile's columns."""
    native = cpu_kernels.native_kernels()
    if vnni and not native.has_vnni():
        pytest.skip("no AVX512-VNNI on this CPU")
    g = torch.Generator().manual_seed(1)
    for m, k, n in [(1, 1, 5), (2, 33, 9), (3, 65, 4), (5, 200, 37), (1, 8192, 8), (8, 130, 33), (12, 65, 7), (15, 200, 38), (16, 8192, 6)]:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        a[0], a[-1], w[0] = 127, -127, -127
        assert torch.equal(native.int8_gemm(a, w, vnni=vnni), (a.long() @ w.long().t()).int()), (m, k, n)


class Saturating(cpu_kernels.IntMmNK):
    """oneDNN's u8 x s8 product without VNNI: pairs of products added in int16 with saturation."""

    def run(self, a, packed):
        u, w = a.long() + 128, packed.long()
        pairs = (u[:, None, :] * w[None, :, :]).reshape(len(u), len(w), -1, 2).sum(-1).clamp(-32768, 32767)
        return (pairs.sum(-1) - 128 * w.sum(1)).int()


def test_a_path_that_is_not_exact_here_is_never_chosen_or_forced(monkeypatch, tmp_path):
    monkeypatch.setitem(cpu_kernels.PATHS, "saturating", Saturating("saturating"))
    monkeypatch.setenv("LLMINT8_CACHE_DIR", str(tmp_path))
    cpu_kernels.exact_here.cache_clear()
    cpu_kernels.decision.cache_clear()
    try:
        a = torch.randint(-20, 21, (3, 64), dtype=torch.int8)
        w = torch.randint(-20, 21, (5, 64), dtype=torch.int8)
        assert torch.equal(Saturating("s").run(a, w), (a.long() @ w.long().t()).int())  # small values: no saturation
        path = cpu_kernels.PATHS["saturating"]
        assert path.runs() and not path.available()
        assert all(p.available() for name, p in cpu_kernels.PATHS.items() if name in CPU_PATHS)
        plan = cpu_kernels.choose((16, 256), int32=True)
        assert "saturating" not in plan.name and "saturating" not in cpu_kernels.decision((16, 256))["timings_ms"]
        monkeypatch.setenv(cpu_kernels.FORCE_ENV, "saturating")
        with pytest.raises(ValueError, match="not exact on this CPU"):
            cpu_kernels.choose((16, 256), int32=True)
    finally:
        cpu_kernels.exact_here.cache_clear()
        cpu_kernels.decision.cache_clear()


def test_forced_gemm_path_is_the_one_prepared(monkeypatch):
    method = get_method("llm.int8")
    qweight = R.quantize_weight(torch.randn(16, 32), method)
    cpu = next(b for b in BACKENDS if b.name == "cpu")
    for name in CPU_PATHS:
        monkeypatch.setenv(cpu_kernels.FORCE_ENV, name)
        assert cpu.prepare(qweight, method).gemm.name == name
    monkeypatch.setenv(cpu_kernels.FORCE_ENV, "amx-magic")
    with pytest.raises(ValueError, match="expected one of"):
        cpu.prepare(qweight, method)


@pytest.mark.skipif(cpu_kernels.native_kernels() is None, reason="no compiler for the native CPU kernels")
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_activation_lane_width_gives_the_reference_bits(dtype):
    """The widest build (AVX-512 where present) runs in models; the narrower ones stay tested too."""
    from llmint8_cli.backends.cpu import column_mask

    native, method = cpu_kernels.native_kernels(), get_method("llm.int8")
    assert native.lane_widths()[-1] == 1
    for k in (1, 7, 33, 172, 256):
        for pattern in PATTERNS:
            x, _, _, stored = make_case((9,), k, 1, dtype, pattern, seed=k)
            stored_idx = torch.empty(0, dtype=torch.long) if stored is None else stored
            expected, columns = R.quantize_activations(x, method, 1.5, stored_idx)
            for lanes in native.lane_widths():
                q, scale, mask = native.quantize_rows(x, column_mask(k, stored_idx), 1.5, lanes)
                assert torch.equal(q, expected.q) and torch.equal(scale, expected.scale), (k, pattern, lanes)
                assert torch.equal(torch.nonzero(mask).flatten(), columns), (k, pattern, lanes)


@pytest.mark.skipif(cpu_kernels.native_kernels() is None, reason="no compiler for the native CPU kernels")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="built with OpenMP on Linux only")
def test_native_kernels_run_on_torchs_threads():
    """A build without OpenMP runs every parallel_for on the calling thread (half the speed on 2 cores)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu_kernels.native_kernels().threads_used(64) == 2
    finally:
        torch.set_num_threads(threads)


LAYER_PATHS = [name for name in CPU_PATHS if cpu_kernels.PATHS[name].finishes_layer or cpu_kernels.PATHS[name].whole_layer]


@pytest.mark.skipif(not LAYER_PATHS, reason="no path here finishes the layer itself")
@pytest.mark.parametrize("path", LAYER_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method_name", ["llm.int8", "llm.int8-rotate", "llm.int8-smooth"])
@pytest.mark.parametrize("stored_columns", [2, 12, 80])  # the epilogue's loop in registers, its loop over many columns, and its GEMM for more
@pytest.mark.parametrize("lead", [(3, 13), (2, 1)])  # 39 rows, which tiles of 16 do not split; a decoded batch of 2
def test_a_layer_finished_in_one_call_gets_the_bits_of_the_separate_calls(monkeypatch, path, dtype, method_name, stored_columns, lead):
    """amx_linear and rowwise_linear (its own tile per strip in cache, or oneDNN's product) finish the
    layer in one native call; every element must get the bits that quantize_sequences, the same
    product and dequantize_sequences give it as separate calls, with tails in m, n and k."""
    method, cpu = get_method(method_name), next(b for b in BACKENDS if b.name == "cpu")
    g = torch.Generator().manual_seed(5)
    k, n = 200, 300  # 3 AMX tiles and a half in k; in n 18.75 of them, and a strip of 256 rows of W and a tail
    x = torch.randn(*lead, k, generator=g)
    stored = torch.arange(stored_columns) * (k // stored_columns)
    x[..., stored] *= 15
    x[1, :, 7] *= 20  # a run-time outlier column in one sequence
    qweight = quantized((torch.randn(n, k, generator=g) / k**0.5).to(dtype), method, stored, x)
    bias = torch.randn(n, generator=g).to(dtype)
    monkeypatch.setenv(cpu_kernels.FORCE_ENV, path)
    one_call = cpu.linear(x.to(dtype), cpu.prepare(qweight, method), method, 6.0, bias)
    monkeypatch.setitem(cpu_kernels.PATHS, path, dataclasses.replace(cpu_kernels.PATHS[path], finishes_layer=False, whole_layer=False))
    separate = cpu.linear(x.to(dtype), cpu.prepare(qweight, method), method, 6.0, bias)
    assert one_call.dtype == dtype and torch.equal(one_call, separate)


@pytest.mark.parametrize("path", [name for name in ("onednn-nk", "onednn-kn") if name in CPU_PATHS])
def test_a_product_too_large_for_the_cache_is_finished_in_chunks_with_the_bits_of_the_whole(monkeypatch, path):
    """rowwise_linear splits a oneDNN product whose int32 sums pass 32 MB (an int8 LM head on a long
    prompt) into chunks of W's rows, each finished while in cache: the output columns of every chunk,
    and the tail, must get the bits of the separate calls over the whole product."""
    method, cpu = get_method("llm.int8"), next(b for b in BACKENDS if b.name == "cpu")
    g = torch.Generator().manual_seed(6)
    k, n = 64, 16400  # 2 sequences of 260 rows: 520 x 16400 int32 sums are 34 MB, chunks of 960 columns and a tail
    x = torch.randn(2, 260, k, generator=g)
    stored = torch.tensor([3, 40])
    x[..., stored] *= 15
    x[1, :, 7] *= 20  # a run-time outlier column in one sequence
    qweight = quantized((torch.randn(n, k, generator=g) / k**0.5).to(torch.bfloat16), method, stored, x)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    monkeypatch.setenv(cpu_kernels.FORCE_ENV, path)
    chunked = cpu.linear(x.bfloat16(), cpu.prepare(qweight, method), method, 6.0, bias)
    monkeypatch.setitem(cpu_kernels.PATHS, path, dataclasses.replace(cpu_kernels.PATHS[path], whole_layer=False))
    whole = cpu.linear(x.bfloat16(), cpu.prepare(qweight, method), method, 6.0, bias)
    assert torch.equal(chunked, whole)


def test_a_weight_larger_than_its_measured_shape_is_timed_from_a_cold_cache_at_decode_sizes(monkeypatch, tmp_path):
    """A weight measured on a slice (measured_shape) streams from memory in a decode step: its plan is
    measured apart, the cache flushed before each call at decode sizes only (a cache-resident slice
    of SmolLM2's int8 head picked oneDNN's product at one row; from memory llmint8's tile is ~2x as fast)."""
    monkeypatch.setenv("LLMINT8_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "LARGEST_MEASURED", 64)
    flushed_at: list[int] = []
    monkeypatch.setattr(cpu_kernels, "evict_cache", lambda buffer: flushed_at.append(buffer.numel()))
    cpu_kernels.decision.cache_clear()
    try:
        cpu_kernels.choose((64, 64), int32=False)
        assert flushed_at == []  # measured as it is
        cpu_kernels.choose((200, 64), int32=False)
        paths = len([p for p in cpu_kernels.PATHS.values() if p.available()])
        assert flushed_at == [cpu_kernels.EVICT_BYTES] * (6 * paths)  # each call at one row (5 timed, 1 warm-up), none at 16 or 128
        shapes = next(iter(json.loads(cpu_kernels.cache_file().read_text()).values()))["shapes"]
        assert set(shapes) == {"64x64", "64x64 streamed"}
    finally:
        cpu_kernels.decision.cache_clear()
