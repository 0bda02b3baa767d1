"""llmint8 generate MODEL PROMPT: text from a 16-bit or int8 model, the quickest proof that it still talks."""

from __future__ import annotations

import math
import time
from typing import Annotated

import torch
import typer

from llmint8_cli import compilation, models
from llmint8_cli.checkpoint.format import is_llmint8_checkpoint, read_quantization_config
from llmint8_cli.checkpoint.quantize import QuantizeOptions
from llmint8_cli.cli.common import (
    ComputeDtype, Device, DeviceMap, MaxMemory, NoVerify, OffloadFolder, Quiet, TrustRemoteCode, Threshold, chosen_placement, command, emit_json, given_options, report_placement, stderr_console,
)
from llmint8_cli.core.methods import DEFAULT_METHOD, get_method
from llmint8_cli.errors import InvalidArgumentError
from llmint8_cli.evaluation import variants
from llmint8_cli.nn.check import CHECK_TOKENS, check_conversion
from llmint8_cli.nn.convert import INT8_HEAD_HELP, INT8_HEAD_PLACED, int8_head_label, quantizable_layers, quantize_head, quantize_model
from llmint8_cli.nn.experts import unfuse_experts
from llmint8_cli.nn.probe import probe_ids
from llmint8_cli.placement import Placement


def load_for_generation(spec: str, method: str, threshold: float | None, dtype: torch.dtype, device: torch.device, verify: bool,
                        given: frozenset[str] = frozenset(), placement: Placement | None = None):
    """(model, tokenizer, method and threshold that run): an llmint8 folder as stored (asking it
    for another method or threshold is refused), a 16-bit model quantized on the fly; with a
    placement spread over devices (a 16-bit model then streamed through quantize first)."""
    if is_llmint8_checkpoint(spec):
        block = read_quantization_config(spec)
        variants.check_request(spec, block, given, {method}, threshold, "method", "run as stored", "generate from the 16-bit model it came from to try another")
        model = variants.load_folder(spec, dtype, verify, device, placement)  # verified before its tokenizer is read
        return model, models.load_tokenizer(models.ModelSource("folder", spec)), block["method"], block["threshold"]
    source = models.resolve(spec)
    threshold = get_method(method).threshold_or_default(threshold)
    if placement is None:
        model = models.load_model(source, dtype=dtype)
        unfuse_experts(model)  # experts as linear layers, as every other path converts them
        originals = dict(quantizable_layers(model))
        quantize_model(model, method, threshold)
        converted = {name: layer for name, layer in originals.items() if model.get_submodule(name) is not layer}
        if converted:  # as quantize checks what it writes (nn/check.py)
            check_conversion(model, converted, probe_ids(model, CHECK_TOKENS))
        return model.to(device), models.load_tokenizer(source), method, threshold
    if not get_method(method).quantized:
        return models.load_model(source, dtype=dtype, placement=placement), models.load_tokenizer(source), method, threshold
    options = QuantizeOptions(method=method, threshold=threshold, calib_samples=0)  # as on one device: run-time outlier detection
    model, _ = variants.placed_quantized(spec, variants.scratch_folder(placement) / method, options, dtype, placement)
    return model, models.load_tokenizer(source), method, threshold


@command
def generate(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="An llmint8 folder or a 16-bit model (folder, .gguf, alias, short name or Hub id).")],
    prompt: Annotated[str, typer.Argument(help="The text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most (fewer if the model ends the text).")] = 32,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy (deterministic); above 0: sampled at this temperature.")] = 0.0,
    seed: Annotated[int, typer.Option(min=0, max=2**64 - 1, help="Random seed for sampling (0 to 2^64-1).")] = 0,
    method: Annotated[str, typer.Option(help="For a 16-bit model: the method it is quantized with on the fly (fp16 keeps it 16-bit).")] = DEFAULT_METHOD,
    threshold: Threshold = None,
    device: Device = "auto",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    dtype: ComputeDtype = "auto",
    no_verify: NoVerify = False,
    trust_remote_code: TrustRemoteCode = False,
    compile: Annotated[str, typer.Option("--compile", help=compilation.HELP + f" auto compiles from --max-new-tokens {compilation.AUTO_DECODE_TOKENS}.")] = "auto",
    int8_head: Annotated[bool, typer.Option("--int8-head", help=INT8_HEAD_HELP)] = False,
    quiet: Quiet = False,
) -> None:
    """Greedy or sampled text; the text and tokens/s on stderr, JSON on stdout."""
    console = stderr_console(quiet)
    get_method(method).threshold_or_default(threshold)
    if not prompt.strip():
        raise InvalidArgumentError("PROMPT is empty")
    if not math.isfinite(temperature):
        raise InvalidArgumentError(f"--temperature must be a finite number of at least 0, got {temperature}")
    placed, run_device = chosen_placement(ctx, device, device_map, max_memory, offload_folder)
    compilation.check_choice(compile, run_device)
    if placed is not None and compile == "on":
        raise InvalidArgumentError("--compile on: a model spread over devices (--device-map) runs eager")
    if placed is not None and int8_head:
        raise InvalidArgumentError(INT8_HEAD_PLACED)
    run_dtype = variants.resolve_dtype(dtype, run_device, inference=True)
    with console.status(f"loading {model}"):
        network, tokenizer, ran, threshold = load_for_generation(model, method, threshold, run_dtype, run_device, not no_verify, given_options(ctx), placed)
        if int8_head:
            quantize_head(network)
    where = report_placement(console, ran, network)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(run_device)
    limit = models.context_length(network.config)
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise InvalidArgumentError(f"the prompt's {ids.shape[1]} tokens and --max-new-tokens {max_new_tokens} exceed the model's context ({limit} tokens)")
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    notes: list[str] = []
    compiled = placed is None and compilation.decide(compile, run_device, max_new_tokens >= compilation.AUTO_DECODE_TOKENS, notes)
    clock = compilation.StepClock()

    def run(compiling: bool):
        clock.times.clear()
        torch.manual_seed(seed)
        if compiling:
            console.print("compiling the decode step (torch.compile, Inductor; tens of seconds the first time for a model shape)")
        options = compilation.generate_options(network) if compiling else {}
        with torch.no_grad():
            return network.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, streamer=clock,
                                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling, **options), compiling

    started = time.perf_counter()
    output, compiled = compilation.run_or_fall_back(run, compiled, compile, notes)
    seconds = time.perf_counter() - started
    new = output[0, ids.shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    rate = new.numel() / seconds
    console.print(f"[bold]{prompt}[/]{text}", markup=True, highlight=False)
    for note in notes:
        console.print(f"note: {note}", highlight=False)
    steps = clock.figures()
    steady = f"; {steps['steady_tokens_per_s']} tokens/s after the first decode step" if steps.get("steady_tokens_per_s") else ""
    console.print(f"{new.numel()} tokens in {seconds:.2f} s: {rate:.1f} tokens/s{steady} ({int8_head_label(ran, int8_head)}, "
                  f"{str(run_dtype).removeprefix('torch.')}, {run_device}"
                  f"{', compiled' if compiled else ''})")
    emit_json("generate", model, {
        "method": ran, "int8_head": int8_head, "threshold": threshold, "dtype": str(run_dtype).removeprefix("torch."), "device": str(run_device),
        "prompt": prompt, "text": text, "prompt_tokens": ids.shape[1], "new_tokens": new.numel(),
        "sampling": {"temperature": temperature, "seed": seed} if temperature > 0 else "greedy",
        "seconds": round(seconds, 3), "tokens_per_s": round(rate, 1), "compiled": compiled, **steps,
        **({"notes": notes} if notes else {}), **({"placement": where} if where else {}),
    })
