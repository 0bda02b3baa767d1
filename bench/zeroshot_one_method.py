"""Fill the lm-eval answer cache of one quantization method without its 16-bit baseline.

`llmint8 eval-zeroshot` always evaluates the 16-bit model first (every delta needs it), so a
full-set job that takes hours uses one core at a time. Run the baseline with
`llmint8 eval-zeroshot ... --methods fp16 --cache-dir C` in one process and this script for the
method in another (one thread each); then the real command, run once more, reads both back:

    python bench/zeroshot_one_method.py MODEL TASKS METHOD CACHE_DIR [DATA_DIR] [BATCH_SIZE] [THRESHOLD] [SHARD] [ROTATION_BLOCK]

The cache path, the calibration (the command's default) and the lm-eval call are the command's
own (variants.cache_folder, variants.subject, zeroshot.evaluate); THRESHOLD is the command's --threshold ("default": the method's own). SHARD "K/N" runs only
the documents whose index is K modulo N, so N processes fill one cache side by side (each answer
is one short line appended in one write to the JSON-lines cache). ROTATION_BLOCK is the command's --rotation-block (default 256). Prints
the method's metrics (of the shard) as JSON.
"""
import contextlib
import json
import sys

from llmint8_cli.checkpoint.quantize import QuantizeOptions
from llmint8_cli.core.methods import check_rotation_block, parse_methods
from llmint8_cli.core.reference import ROTATION_BLOCK
from llmint8_cli.evaluation import variants, zeroshot


def main(model: str, tasks: str, method: str, cache_dir: str, data_dir: str = "../shared/data", batch_size: str = "32",
         threshold: str = "default", shard: str = "0/1", rotation_block: str = str(ROTATION_BLOCK)) -> None:
    outlier_threshold = None if threshold == "default" else float(threshold)  # checked by variants.subject
    names = zeroshot.parse_tasks(tasks, local=True)
    with zeroshot.task_configs() as configs:
        evaluate_shard(model, names, method, cache_dir, data_dir, int(batch_size), outlier_threshold, shard, int(rotation_block), configs)


def evaluate_shard(model: str, names: list[str], method: str, cache_dir: str, data_dir: str, batch_size: int, outlier_threshold: float | None,
                   shard: str, rotation_block: int, configs) -> None:
    manager, task_names, _ = zeroshot.task_manager(names, data_dir, True, configs)
    samples = shard_samples(shard, manager, task_names)
    device = variants.resolve_device("auto")
    dtype = variants.resolve_dtype("auto", device)
    # the command's default: calibrated as quantize calibrates
    calibration = QuantizeOptions(data_dir=data_dir, rotation_block=check_rotation_block(rotation_block))
    subject = variants.subject(model, parse_methods(method), outlier_threshold, dtype, device, calibration=calibration)
    for name, network in subject.variants:
        if name == variants.BASELINE:
            continue  # the generator quantizes lazily: skipping the baseline costs nothing
        folder = variants.cache_folder(cache_dir, subject, name, dtype, device)
        with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints; stdout stays JSON
            evaluation = zeroshot.evaluate(network, subject.tokenizer, manager, task_names, None, 0, batch_size, str(device), folder, samples)
        print(json.dumps({name: evaluation.results, "batch_size": evaluation.batch_size}))


def shard_samples(shard: str, manager, task_names: dict[str, str]) -> dict[str, list[int]] | None:
    """{task: the document indices of shard K of N}, or None for the whole set."""
    try:
        index, count = (int(part) for part in shard.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        sys.exit(f"SHARD must be K/N with 0 <= K < N, got {shard}")
    if count == 1:
        return None
    tasks = manager.load(list(task_names.values()))["tasks"]
    return {ours: list(range(index, len(tasks[theirs].eval_docs), count)) for ours, theirs in task_names.items()}


if __name__ == "__main__":
    if not 5 <= len(sys.argv) <= 10:
        sys.exit("usage: python bench/zeroshot_one_method.py MODEL TASKS METHOD CACHE_DIR [DATA_DIR] [BATCH_SIZE] [THRESHOLD] [SHARD] [ROTATION_BLOCK]")
    main(*sys.argv[1:])
