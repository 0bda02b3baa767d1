"""llmint8 eval-zeroshot MODEL --tasks ...: lm-evaluation-harness tasks, 16-bit vs int8."""

from __future__ import annotations

import contextlib
import io
import sys
import time
from typing import Annotated

import typer

from llmint8_cli.backends import gemm_report
from llmint8_cli import distributed, models
from llmint8_cli.checkpoint.quantize import QuantizeOptions
from llmint8_cli.cli.common import METHODS_HELP, CalibDataset, CalibSamples, CalibSeqLen, ComputeDtype, Device, DeviceMap, MaxMemory, OffloadFolder, OutlierRatio, RotationBlock, SmoothAlpha, Model, NoVerify, Quiet, TrustRemoteCode, Threshold, choose_model, evaluation_placement, command, emit_json, given_options, print_table, report_placement, stderr_console, warn
from llmint8_cli.core.methods import DEFAULT_METHOD, parse_methods
from llmint8_cli.evaluation import request_cache, variants, zeroshot


@command
def eval_zeroshot(
    ctx: typer.Context,
    model: Model = None,
    tasks: Annotated[str, typer.Option(help=f"Comma-separated lm-eval tasks; offline or with --data-dir: {', '.join(zeroshot.TASKS)} (lambada = LAMBADA-OpenAI), from local files.")] = "winogrande,hellaswag,piqa,lambada",
    methods: Annotated[str, typer.Option(help=METHODS_HELP)] = DEFAULT_METHOD,
    threshold: Threshold = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N documents of each task.")] = None,
    num_fewshot: Annotated[int, typer.Option(min=0, help="Few-shot examples per prompt.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Requests per forward pass.")] = 8,
    data_dir: Annotated[str | None, typer.Option(help="Local data folder (layout of shared/data); using it selects the local task configs.")] = None,
    cache_dir: Annotated[str | None, typer.Option(help="Keep each model's answers here (lm-eval's request cache): a run stopped part-way resumes where it stopped.")] = None,
    calib_samples: CalibSamples = QuantizeOptions.calib_samples,
    calib_seq_len: CalibSeqLen = QuantizeOptions.calib_seq_len,
    calib_dataset: CalibDataset = QuantizeOptions.calib_dataset,
    smooth_alpha: SmoothAlpha = QuantizeOptions.smooth_alpha,
    rotation_block: RotationBlock = QuantizeOptions.rotation_block,
    outlier_ratio: OutlierRatio = QuantizeOptions.outlier_ratio,
    device: Device = "auto",
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    dtype: ComputeDtype = "auto",
    no_verify: NoVerify = False,
    trust_remote_code: TrustRemoteCode = False,
    quiet: Quiet = False,
) -> None:
    """Zero-shot accuracy through lm-eval per method; JSON on stdout, a table on stderr. Under
    torchrun lm-eval shares the documents out between the processes and rank 0 reports."""
    console = stderr_console(quiet or not distributed.is_main())
    model = choose_model(model, console, models.DEFAULT_MODEL)
    local = zeroshot.use_local_tasks(data_dir)
    names = zeroshot.parse_tasks(tasks, local)
    chosen = parse_methods(methods)
    placed, run_device = evaluation_placement(ctx, device, device_map, max_memory, offload_folder)
    with zeroshot.task_configs() as configs:  # removed at the end, also on Ctrl-C or SIGTERM
        manager, task_names, source = zeroshot.task_manager(names, data_dir, local, configs)
        run_dtype = variants.resolve_dtype(dtype, run_device)
        with console.status(f"loading {model}"):
            calibration = QuantizeOptions(calib_samples=calib_samples, calib_seq_len=calib_seq_len, calib_dataset=calib_dataset, data_dir=data_dir, smooth_alpha=smooth_alpha,
                                          rotation_block=rotation_block, outlier_ratio=outlier_ratio, given=given_options(ctx))
            subject = variants.subject(model, chosen, threshold, run_dtype, run_device, verify=not no_verify, calibration=calibration, placement=placed)
        for line in subject.warnings:
            warn(line)
        distributed.agree({"the task data": zeroshot.data_digest(configs, task_names, limit, num_fewshot), **variants.run_identity(subject, chosen, calibration)},
                          "another --data-dir or LLMINT8_DATA_DIR, --tasks, --limit or --num-fewshot?")
        results, per_document, seconds, caches, notes, placements = {}, {}, {}, {}, list(subject.notes), {}
        for name, network in subject.variants:
            console.print(f"[bold]{variants.shown_name(name, run_dtype)}[/]: {', '.join(names)}")
            where = report_placement(console, variants.shown_name(name, run_dtype), network)
            if where:
                placements[name] = where
            started = time.time()
            folder = variants.cache_folder(cache_dir, subject, name, run_dtype, run_device) if cache_dir else None
            for legacy in request_cache.legacy_caches(folder) if folder else []:
                notes.append(f"{legacy}: a pickled lm-eval cache of an earlier llmint8, not read (a pickle can run code); "
                             "its answers are computed again (bench/convert_request_caches.py converts one you trust)")
                warn(notes[-1])
            chatter = sys.stderr if console.is_terminal else io.StringIO()  # lm-eval's bars and logs: on a terminal only; stdout is for our JSON
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                evaluation = zeroshot.evaluate(network, subject.tokenizer, manager, task_names, limit, num_fewshot, batch_size, str(run_device), folder)
            del network
            if evaluation is None:  # not rank 0: its samples went to rank 0
                continue
            results[name], per_document[name], caches[name] = evaluation.results, evaluation.per_document, evaluation.cache
            if evaluation.batch_size != batch_size:
                notes.append(f"{name}: one request per forward pass (its outlier columns or tensor scales span a sequence, "
                             "and lm-eval pads batches without a mask)")
            seconds[name] = round(time.time() - started, 1)
    distributed.finish()
    if not distributed.is_main():
        return
    baseline = results.get(variants.BASELINE)
    document = {"processes": distributed.world_size(), "tasks": {}, "data": source, "limit": limit, "num_fewshot": num_fewshot,
                "device": str(run_device), "dtype": str(run_dtype).removeprefix("torch."), "thresholds": subject.thresholds,
                "seconds": seconds, "calibration": {m: subject.calibration_of(m) for m in results},
                "settings": {m: subject.settings_of(m) for m in results if subject.settings_of(m)}, "notes": notes, "parameters": subject.parameters,
                **({"caches": caches} if cache_dir else {}), **({"placement": placements} if placements else {})}
    columns = ["task", "metric", *(variants.shown_name(m, run_dtype) for m in results), *(["Δ " + m for m in results if m != variants.BASELINE] if baseline else [])]
    rows = []
    for task in names:
        per_task = {}
        for method, metrics in results.items():
            entry = dict(metrics[task])
            if baseline and method != variants.BASELINE:
                entry["delta"] = {k: round(v - baseline[task][k], 6) for k, v in metrics[task].items() if not k.endswith("_stderr") and v is not None and baseline[task].get(k) is not None}
                base_documents = per_document[variants.BASELINE][task]
                paired = {k: zeroshot.paired_delta_stderr(base_documents[k], values) for k, values in per_document[method][task].items() if k in base_documents}
                entry["delta_stderr"] = {k: round(v, 6) for k, v in paired.items() if v is not None}
            per_task[method] = entry
        document["tasks"][task] = per_task
        for metric in (k for k in results[next(iter(results))][task] if not k.endswith("_stderr")):
            cells = [f"{results[m][task].get(metric, float('nan')):.4f} ± {results[m][task].get(metric + '_stderr') or 0:.4f}" for m in results]
            deltas = [delta_cell(per_task[m], metric) for m in results if m != variants.BASELINE] if baseline else []
            rows.append([task, metric, *cells, *deltas])
    document["int8_gemm"] = gemm_report()
    print_table(console, f"zero-shot · {subject.label}{f' · limit {limit}' if limit else ''}", columns, rows)
    console.print(variants.calibration_line(subject))
    emit_json("eval-zeroshot", model, document)


def delta_cell(entry: dict, metric: str) -> str:
    """The delta, with its paired stderr where the metric is a per-document mean."""
    paired = entry["delta_stderr"].get(metric)
    return f"{entry['delta'].get(metric, float('nan')):+.4f}" + ("" if paired is None else f" ± {paired:.4f}")
