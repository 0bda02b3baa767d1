"""Timing of layers and models for `llmint8 bench` (median and spread of repeated calls)."""

from __future__ import annotations

import copy
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from llmint8_cli.nn.linear import Int8Linear

PAPER_HIDDEN = (768, 1024, 2048, 2560, 4096, 5140, 8192, 12288)  # Appendix D, Table 5: W is 4d x d


def paper_shapes() -> list[tuple[int, int]]:
    return [(4 * d, d) for d in PAPER_HIDDEN]


def machine() -> dict:
    flags = []
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma", "f16c")))
                    break
    except OSError:
        pass
    from llmint8_cli.backends.cpu_kernels import gemm_name

    return {
        "cpu": platform.processor() or platform.machine(), "cpu_flags": flags, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_int8_gemm": gemm_name(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float


def time_calls(fn: Callable[[], object], repeat: int, device: torch.device) -> Timing:
    """Median/min/max wall time of `repeat` calls after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - started) * 1e3)
    return Timing(statistics.median(samples), min(samples), max(samples))


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def layer_rows(out_features: int, in_features: int, outlier_counts: list[int], device: torch.device, with_bnb: bool) -> list[tuple[str, nn.Module, torch.dtype, int]]:
    """(row name, layer, activation dtype, outlier columns) for one weight shape."""
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features, bias=False, device=device)
    sixteen = [torch.bfloat16, torch.float16]
    rows = [("fp32", base, torch.float32, 0)]
    rows += [(str(dt).removeprefix("torch."), copy.deepcopy(base).to(dt), dt, 0) for dt in sixteen]
    act = torch.bfloat16 if device.type == "cpu" else torch.float16
    half = copy.deepcopy(base).to(act)
    rows.append(("int8 (vectorwise)", Int8Linear.from_linear(half, "vectorwise"), act, 0))
    for count in outlier_counts:
        stored = torch.arange(count) * (in_features // max(count, 1))
        rows.append((f"llm.int8 ({count} outliers)", Int8Linear.from_linear(half, "llm.int8", outlier_idx=stored), act, count))
    if with_bnb:
        bnb_row = bitsandbytes_row(half, device)
        if bnb_row is not None:
            rows.append(("bitsandbytes Linear8bitLt", bnb_row, act, 6))
    return rows


def bitsandbytes_row(linear: nn.Linear, device: torch.device):
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(linear.weight.data.clone().cpu(), requires_grad=False, has_fp16_weights=False)
    return layer.to(device)


def activations(tokens: int, in_features: int, outliers: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normal activations with `outliers` feature columns of magnitude ~20 (above the 6.0 threshold)."""
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, in_features, generator=g)
    if outliers:
        x[:, torch.arange(outliers) * (in_features // outliers)] *= 20
    return x.to(device=device, dtype=dtype)


@torch.inference_mode()
def bench_layer(out_features: int, in_features: int, tokens: list[int], outlier_counts: list[int], repeat: int, device: torch.device, with_bnb: bool = True, progress=None) -> list[dict]:
    rows = layer_rows(out_features, in_features, outlier_counts, device, with_bnb)
    fp32_layer = rows[0][1]
    sixteen_name = "bfloat16" if device.type == "cpu" else "float16"
    results = []
    for m in tokens:
        baseline = None
        per_m = []
        for name, layer, dtype, outliers in rows:
            x = activations(m, in_features, max(outliers, 6 if name.startswith("bitsandbytes") else 0), dtype, device)
            timing = time_calls(lambda: layer(x), repeat, device)
            reference = fp32_layer(x.float())
            y = layer(x).float()
            error = float((y - reference).norm() / reference.norm().clamp_min(1e-30))
            row = {
                "shape": f"{out_features}x{in_features}", "tokens": m, "row": name, "median_ms": round(timing.median_ms, 4),
                "min_ms": round(timing.min_ms, 4), "max_ms": round(timing.max_ms, 4), "rel_error_vs_fp32": round(error, 6),
                "weight_mib": round(weight_bytes(layer) / 2**20, 3),
            }
            if name == sixteen_name:
                baseline = timing.median_ms
            per_m.append(row)
            if progress:
                progress()
        for row in per_m:
            row["speedup_vs_16bit"] = round(baseline / row["median_ms"], 3) if baseline else None
        results += per_m
    return results


@torch.inference_mode()
def bench_model(model: nn.Module, prompt_tokens: int, new_tokens: int, repeat: int, device: torch.device, batch: int = 1) -> dict:
    """Prefill tokens/s (one forward over `batch` prompts) and decode tokens/s (greedy, KV cache, all sequences)."""
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    prefill = time_calls(lambda: model(input_ids=ids, use_cache=False), repeat, device)
    generate = lambda: model.generate(ids[:, :8], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # noqa: E731
    decode = time_calls(generate, max(1, repeat // 2), device)
    return {
        "prefill_tokens_per_s": round(batch * prompt_tokens / (prefill.median_ms / 1e3), 1),
        "prefill_ms": round(prefill.median_ms, 2),
        "decode_tokens_per_s": round(batch * new_tokens / (decode.median_ms / 1e3), 2),
        "weight_mib": round(weight_bytes(model) / 2**20, 1),
    }
