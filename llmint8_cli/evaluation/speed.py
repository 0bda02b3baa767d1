"""Timing of layers and models for `llmint8 bench` (median and spread of repeated calls)."""

from __future__ import annotations

import copy
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmint8_cli import ops
from llmint8_cli.core.reference import ROTATION_BLOCK
from llmint8_cli.errors import InvalidArgumentError
from llmint8_cli.nn.attention import use_native_attention
from llmint8_cli.nn.linear import Int8Linear

FLOAT_ROWS = ("fp32", "bfloat16", "float16")
DECODE_PROMPT_TOKENS = 8  # the prompt each decoded sequence starts from
PAPER_HIDDEN = (768, 1024, 2048, 2560, 4096, 5140, 8192, 12288)  # Appendix D, Table 5: W is 4d x d


def paper_shapes() -> list[tuple[int, int]]:
    return [(4 * d, d) for d in PAPER_HIDDEN]


def machine() -> dict:
    """The CPU (model, flags, threads), torch and the GPU: every speed figure goes beside these."""
    from llmint8_cli.backends.cpu_kernels import machine_key

    return {
        **machine_key(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def gemm_plan(layer: nn.Module) -> str | None:
    """The int8 GEMM plan an Int8Linear ran with (CPU), or None."""
    gemm = getattr(ops.prepared_of(layer), "gemm", None)
    return gemm.name if gemm is not None else None


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float


def time_interleaved(calls: dict[str, Callable[[], object]], repeat: int, device: torch.device) -> dict[str, Timing]:
    """Median/min/max wall time of `repeat` calls of each, after one warm-up call of each.

    The calls take turns (one of each, `repeat` rounds), so that a slow spell of a shared machine
    falls on all of them alike and their ratios hold; timed one after another, a ratio moved by
    ±25 % between runs on a busy VM.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in calls.values():
        fn()
        sync()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            started = time.perf_counter()
            fn()
            sync()
            samples[name].append((time.perf_counter() - started) * 1e3)
    return {name: Timing(statistics.median(t), min(t), max(t)) for name, t in samples.items()}


def weight_bytes(module: nn.Module) -> int:
    return sum(tensor_bytes(t) for t in list(module.parameters()) + list(module.buffers()))


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes held, counting the inner tensors of a wrapper subclass (torchao's int8 weights)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def layer_rows(out_features: int, in_features: int, outlier_counts: list[int], device: torch.device, with_peers: bool, notes: list[str],
               rotation_block: int = ROTATION_BLOCK) -> list[tuple[str, nn.Module, torch.dtype, int]]:
    """(row name, layer, activation dtype, outlier columns) for one weight shape; a peer that is
    not installed gets a line in `notes` instead of a row."""
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features, bias=False, device=device)
    sixteen = [torch.bfloat16, torch.float16]
    rows = [("fp32", base, torch.float32, 0)]
    rows += [(str(dt).removeprefix("torch."), copy.deepcopy(base).to(dt), dt, 0) for dt in sixteen]
    act = torch.bfloat16 if device.type == "cpu" else torch.float16
    half = copy.deepcopy(base).to(act)
    rows.append(("int8 (vectorwise)", Int8Linear.from_linear(half, "vectorwise"), act, 0))
    for count in outlier_counts:
        rows.append((f"llm.int8 ({count} outliers)", Int8Linear.from_linear(half, "llm.int8", outlier_idx=outlier_columns(count, in_features)), act, count))
    if outlier_counts:  # llmint8's own methods beside llm.int8 at the paper's usual handful of outliers
        count = 6 if 6 in outlier_counts else outlier_counts[0]
        ranges = activations(128, in_features, count, torch.float32, device).abs().amax(dim=0)  # its calibration
        smooth = Int8Linear.from_linear(half, "llm.int8-smooth", outlier_idx=outlier_columns(count, in_features), input_max=ranges)
        rows.append((f"llm.int8-smooth ({count} outliers)", smooth, act, count))
        rotate = Int8Linear.from_linear(half, "llm.int8-rotate", outlier_idx=outlier_columns(count, in_features), rotation_block=rotation_block)
        width = "" if rotation_block == ROTATION_BLOCK else f", {rotation_block}-wide blocks"
        rows.append((f"llm.int8-rotate ({count} outliers{width})", rotate, act, count))
    if with_peers:
        for name, make, outliers in PEERS:
            try:
                rows.append((name, make(half, device), act, outliers))
            except ImportError as exc:
                note = f"{name}: not installed ({exc.name}); pip install 'llmint8[peers]'"
                if note not in notes:
                    notes.append(note)
    return rows


def bitsandbytes_row(linear: nn.Linear, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(linear.weight.data.clone().cpu(), requires_grad=False, has_fp16_weights=False)
    return layer.to(device)


def torchao_w8a8(module: nn.Module, filter_fn=None) -> nn.Module:
    """torchao's int8 dynamic-activation, int8-weight quantization (W8A8, no decomposition), eager,
    in place on the linears `filter_fn(module, name)` accepts (every one by default)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(module, Int8DynamicActivationInt8WeightConfig(), **({} if filter_fn is None else {"filter_fn": filter_fn}))  # torchao's default: its linears
    return module


def torchao_row(linear: nn.Linear, device: torch.device) -> nn.Module:
    return torchao_w8a8(nn.Sequential(copy.deepcopy(linear)))[0]


PEERS = [("bitsandbytes Linear8bitLt", bitsandbytes_row, 6), ("torchao W8A8 (eager)", torchao_row, 0)]


def outlier_columns(count: int, in_features: int) -> torch.Tensor:
    """The bench's outlier features: `count` columns spread evenly over the input."""
    return torch.arange(count) * (in_features // max(count, 1))


def activations(tokens: int, in_features: int, outliers: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normal activations with `outliers` feature columns of magnitude ~20 (above the 6.0 threshold)."""
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, in_features, generator=g)
    if outliers:
        x[:, outlier_columns(outliers, in_features)] *= 20
    return x.to(device=device, dtype=dtype)


@torch.inference_mode()
def bench_layer(out_features: int, in_features: int, tokens: list[int], outlier_counts: list[int], repeat: int, device: torch.device, with_peers: bool = True, progress=None,
                notes: list[str] | None = None, rotation_block: int = ROTATION_BLOCK) -> list[dict]:
    """Every row at every token count; `speedup_vs_16bit` against bf16 (CPU) or fp16 (GPU), and
    `speedup_vs_best_float` against the fastest of fp32/bf16/fp16 at that count (a CPU without
    native 16-bit matmul runs fp32 fastest)."""
    rows = layer_rows(out_features, in_features, outlier_counts, device, with_peers, notes if notes is not None else [], rotation_block)
    fp32_layer = rows[0][1]
    sixteen_name = "bfloat16" if device.type == "cpu" else "float16"
    results = []
    for m in tokens:
        baseline = None
        per_m = []
        inputs = {name: activations(m, in_features, outliers, dtype, device) for name, _, dtype, outliers in rows}
        timings = time_interleaved({name: functools.partial(layer, inputs[name]) for name, layer, _, _ in rows}, repeat, device)
        for name, layer, _, _ in rows:
            x, timing, plan = inputs[name], timings[name], gemm_plan(layer)
            reference = fp32_layer(x.float())
            y = layer(x).float()
            error = float((y - reference).norm() / reference.norm().clamp_min(1e-30))
            row = {
                "shape": f"{out_features}x{in_features}", "tokens": m, "row": name, "median_ms": round(timing.median_ms, 4),
                "min_ms": round(timing.min_ms, 4), "max_ms": round(timing.max_ms, 4), "rel_error_vs_fp32": round(error, 6),
                "weight_mib": round(weight_bytes(layer) / 2**20, 3),
                **({"int8_gemm": plan} if plan else {}),
            }
            if name == sixteen_name:
                baseline = timing.median_ms
            per_m.append(row)
            if progress:
                progress()
        best_float = min(r["median_ms"] for r in per_m if r["row"] in FLOAT_ROWS)
        for row in per_m:
            row["speedup_vs_16bit"] = round(baseline / row["median_ms"], 3) if baseline else None
            row["speedup_vs_best_float"] = round(best_float / row["median_ms"], 3)
        results += per_m
    return results


def prefill_call(network, ids: torch.Tensor) -> Callable[[], object]:
    """One forward over the prompt: our models through transformers (or their compiled forward), a peer engine (peers.py) its own way."""
    if not isinstance(network, nn.Module):  # torch.compile's wrapper is a module too
        return functools.partial(network.prefill, ids)
    return functools.partial(torch.inference_mode()(network), input_ids=ids, use_cache=False)


def decode_call(network, ids: torch.Tensor, new_tokens: int, compiled: bool = False) -> Callable[[], object]:
    """Greedy decoding of exactly `new_tokens` tokens after the prompts `ids` (one row a sequence);
    `compiled`: the decode step compiled, through a static cache (compilation.generate_options)."""
    if isinstance(network, nn.Module):
        from llmint8_cli import compilation

        options = compilation.generate_options(network) if compiled else {}
        return functools.partial(network.generate, ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **options)
    return functools.partial(network.decode, ids, new_tokens)


def bench_models(networks: dict, prompt_lengths: list[int], batches: list[int], new_tokens: int, repeat: int, device: torch.device,
                 vocab_size: int | None = None, compile_choice: str | None = None, notes: list[str] | None = None) -> dict:
    """Per network (our models, or peer engines: peers.py): prefill tokens/s (one forward over one
    prompt of each length) and decode tokens/s (greedy, KV cache, `new_tokens` after an 8-token
    prompt, for each batch of sequences decoded together), the networks timed in turn on the same
    inputs (the same again in a later call: the ids come from a fixed seed). With `compile_choice`
    (compilation.decide said to compile) our models run compiled: the forward for each prompt length,
    the decode step through a static cache; each first call's seconds (the compile) go in `compile_s`."""
    from llmint8_cli import compilation

    vocab = vocab_size or next(net for net in networks.values() if isinstance(net, nn.Module)).config.vocab_size
    g = torch.Generator().manual_seed(0)
    results = {name: {"prefill": {}, "decode": {}, "weight_mib": round((weight_bytes(net) if isinstance(net, nn.Module) else net.weight_bytes) / 2**20, 1)}
               for name, net in networks.items()}
    for name, net in networks.items():
        if isinstance(net, nn.Module):
            results[name]["attention"] = net.config._attn_implementation
    forwards = {name: compilation.compiled_forward(net) for name, net in networks.items() if compile_choice and isinstance(net, nn.Module)}
    for name in forwards:
        results[name].update(compiled=True, compile_s={})

    def calls_for(phase: str, size: int, eager: dict[str, Callable[[], object]], compiled: dict[str, Callable[[], object]]) -> dict[str, Callable[[], object]]:
        for name, call in compiled.items():
            if results[name].get("compiled"):
                eager[name], seconds = compilation.first_call(name, call, eager[name], compile_choice, notes if notes is not None else [])
                results[name]["compiled"] = seconds is not None
                results[name]["compile_s"][f"{phase} {size}"] = seconds
        return eager

    for length in prompt_lengths:
        ids = torch.randint(3, vocab, (1, length), generator=g).to(device)
        calls = calls_for("prefill", length, {name: prefill_call(net, ids) for name, net in networks.items()},
                          {name: prefill_call(forward, ids) for name, forward in forwards.items()})
        for name, timing in time_interleaved(calls, repeat, device).items():
            results[name]["prefill"][str(length)] = {"tokens_per_s": round(length / (timing.median_ms / 1e3), 1), "median_ms": round(timing.median_ms, 2)}
    for batch in batches:
        ids = torch.randint(3, vocab, (batch, DECODE_PROMPT_TOKENS), generator=g).to(device)
        calls = calls_for("decode", batch, {name: decode_call(net, ids, new_tokens) for name, net in networks.items()},
                          {name: decode_call(networks[name], ids, new_tokens, compiled=True) for name in forwards})
        for name, timing in time_interleaved(calls, max(1, repeat // 2), device).items():
            results[name]["decode"][str(batch)] = {"tokens_per_s": round(batch * new_tokens / (timing.median_ms / 1e3), 2), "median_ms": round(timing.median_ms, 2)}
    if device.type == "cpu":  # (a GPU's calls return before they finish: hooks cannot time them)
        for name, net in networks.items():
            if isinstance(net, nn.Module) and not quantized_by_subclass(net):
                results[name]["decode_step"] = decode_step_parts(net, vocab, device)
    return results


DECODE_PART_STEPS = 16  # one-token steps timed for the decode step's parts


@torch.inference_mode()
def decode_step_parts(model: nn.Module, vocab: int, device: torch.device) -> dict:
    """Where an eager one-token decode step's time goes (batch 1, dynamic cache, after an 8-token
    prompt): the Int8Linear calls, the 16-bit nn.Linear calls (the LM head among them) and the rest
    (attention, norms, rotary, cache, Python), each call timed by hooks around it, as the issue's
    figures were taken; with the bytes each streams per second (weights over time)."""
    kinds = {"int8_linears": [m for m in model.modules() if isinstance(m, Int8Linear)],
             "sixteen_bit_linears": [m for m in model.modules() if type(m) is nn.Linear]}
    head = model.get_output_embeddings()
    spent = {kind: 0.0 for kind in kinds} | {"head": 0.0}
    started: dict[int, float] = {}
    handles = []
    for kind, layers in kinds.items():
        for layer in layers:
            handles.append(layer.register_forward_pre_hook(lambda module, args: started.__setitem__(id(module), time.perf_counter())))
            handles.append(layer.register_forward_hook(functools.partial(_stop_clock, started, spent, kind, layer is head)))
    g = torch.Generator().manual_seed(1)
    try:
        out = model(input_ids=torch.randint(3, vocab, (1, DECODE_PROMPT_TOKENS), generator=g).to(device), use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for kind in spent:
            spent[kind] = 0.0  # the prompt's calls are not a step's
        begun = time.perf_counter()
        for _ in range(DECODE_PART_STEPS):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        step = (time.perf_counter() - begun) / DECODE_PART_STEPS
    finally:
        for handle in handles:
            handle.remove()
    per_step = {kind: seconds / DECODE_PART_STEPS for kind, seconds in spent.items()}
    int8_bytes = sum(layer.weight.numel() for layer in kinds["int8_linears"])
    head_bytes = tensor_bytes(head.weight) if type(head) in (nn.Linear, Int8Linear) else 0
    parts = {"step_ms": round(step * 1e3, 2), "int8_linears_ms": round(per_step["int8_linears"] * 1e3, 2),
             "int8_linear_calls": len(kinds["int8_linears"]), "sixteen_bit_linears_ms": round(per_step["sixteen_bit_linears"] * 1e3, 2),
             "rest_ms": round((step - per_step["int8_linears"] - per_step["sixteen_bit_linears"]) * 1e3, 2)}
    # three decimals: a small model's head (a few KB) streams at well under 0.05 GB/s, which one would round to 0
    if per_step["int8_linears"]:
        parts["int8_weights_gb_per_s"] = round(int8_bytes / per_step["int8_linears"] / 1e9, 3)
    if per_step["head"]:
        parts["head_gb_per_s"] = round(head_bytes / per_step["head"] / 1e9, 3)
    return parts


def quantized_by_subclass(model: nn.Module) -> bool:
    """Whether the model's nn.Linear layers hold wrapper-subclass weights (torchao's): their int8
    calls would count as 16-bit ones in decode_step_parts, which leaves such a model out."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return any(type(m) is nn.Linear and is_traceable_wrapper_subclass(m.weight) for m in model.modules())


def _stop_clock(started: dict, spent: dict, kind: str, is_head: bool, module, args, output) -> None:
    seconds = time.perf_counter() - started.pop(id(module))
    spent[kind] += seconds
    if is_head:
        spent["head"] += seconds


def random_model(config, dtype: torch.dtype, device: torch.device, where: str) -> nn.Module:
    """transformers' causal LM of `config` with random weights (its own initialization, seeded), in
    `dtype` on `device`; a model larger than the memory free is refused first, in one line."""
    import psutil

    from llmint8_cli import models

    skeleton = models.build_skeleton(lambda: models.causal_lm_from_config(config, dtype), where)
    needed = sum(tensor_bytes(p) for p in skeleton.parameters())
    free = psutil.virtual_memory().available if device.type == "cpu" else torch.cuda.mem_get_info(device)[0]
    if needed > free:
        raise InvalidArgumentError(f"{where}: {needed / 2**30:.1f} GiB of {str(dtype).removeprefix('torch.')} weights, {free / 2**30:.1f} GiB free on {device}")
    torch.manual_seed(0)
    with torch.device(device):
        return use_native_attention(models.causal_lm_from_config(config, dtype)).eval()


def bench_random_weights(config, where: str, method: str, threshold: float | None, dtype: torch.dtype, device: torch.device, baseline: str,
                         prompt_lengths: list[int], batches: list[int], new_tokens: int, repeat: int, peers_folder: Path | None, notes: list[str],
                         compile_choice: str | None = None, int8_head: bool = False) -> dict:
    """bench_models for a model of `config` with random weights: the 16-bit model, then the same
    weights quantized in place by `method` (run-time outlier detection: random weights have no
    features of their own to calibrate), with `int8_head` then its LM head too (another row), then
    the peer engines of the same weights (saved into `peers_folder` first; None: no peers), timed
    one after the other, so that a model is never held twice (an 8B model in bf16 fits 24 GiB
    once). `compile_choice`: --compile's value."""
    from llmint8_cli.evaluation import peers
    from llmint8_cli.nn.convert import quantize_model

    from llmint8_cli import compilation

    model = random_model(config, dtype, device, where)
    vocab = model.config.get_text_config().vocab_size
    compile_choice = compile_choice if compile_choice and compilation.decide(compile_choice, device, compilation.large_enough(model), notes) else None
    results = bench_models({baseline: model}, prompt_lengths, batches, new_tokens, repeat, device, compile_choice=compile_choice, notes=notes)
    saved = peers.save_16bit(model, peers_folder / "model") if peers_folder is not None else None
    quantize_model(model, method, threshold)
    torch._dynamo.reset()  # the same module, now quantized: compiled afresh
    results.update(bench_models({method: model}, prompt_lengths, batches, new_tokens, repeat, device, compile_choice=compile_choice, notes=notes))
    if int8_head:
        results.update(bench_int8_head(model, method, prompt_lengths, batches, new_tokens, repeat, device, compile_choice, notes))
    del model
    engines = peers.engines(saved, prompt_lengths, batches, new_tokens, notes) if saved is not None else {}
    if engines:
        results.update(bench_models(engines, prompt_lengths, batches, new_tokens, repeat, device, vocab_size=vocab))
    return results


def bench_int8_head(model: nn.Module, method: str, prompt_lengths: list[int], batches: list[int], new_tokens: int, repeat: int, device: torch.device,
                    compile_choice: str | None, notes: list[str]) -> dict:
    """bench_models of an int8 model (just timed as `method`) again, its LM head quantized in place
    (nn.convert.quantize_head), as the row `int8_head_label(method)`."""
    from llmint8_cli.nn.convert import int8_head_label, quantize_head

    quantize_head(model)
    torch._dynamo.reset()  # the same module with another head: compiled afresh
    return bench_models({int8_head_label(method): model}, prompt_lengths, batches, new_tokens, repeat, device, compile_choice=compile_choice, notes=notes)


def add_speedups(results: dict, baseline: str) -> None:
    """Each phase's `speedup` and the `weight_ratio` of every network against `baseline`'s."""
    base = results[baseline]
    for row in results.values():
        for phase in ("prefill", "decode"):
            for size, entry in row[phase].items():
                entry["speedup"] = round(entry["tokens_per_s"] / base[phase][size]["tokens_per_s"], 3)
        row["weight_ratio"] = round(row["weight_mib"] / base["weight_mib"], 3)


def torchao_model(model: nn.Module) -> nn.Module:
    """A copy of a 16-bit model with torchao W8A8 on every linear but the LM head (kept 16-bit, as ours)."""
    copied = copy.deepcopy(model)
    head = copied.get_output_embeddings()
    return torchao_w8a8(copied, lambda module, name: isinstance(module, nn.Linear) and module is not head)
