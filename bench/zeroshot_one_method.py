"""Fill the lm-eval answer cache of one quantization method without its 16-bit baseline.

`llmint8 eval-zeroshot` always evaluates the 16-bit model first (every delta needs it), so a
full-set job that takes hours uses one core at a time. Run the baseline with
`llmint8 eval-zeroshot ... --methods fp16 --cache-dir C` in one process and this script for the
method in another (one thread each); then the real command, run once more, reads both back:

    python bench/zeroshot_one_method.py MODEL TASKS METHOD CACHE_DIR [DATA_DIR] [BATCH_SIZE] [THRESHOLD]

The cache path and the lm-eval call are the command's own (variants.cache_folder,
zeroshot.evaluate); THRESHOLD is the command's --threshold (default 6.0).
Prints the method's metrics as JSON.
"""
import contextlib
import json
import sys

from llmint8_cli.core.methods import DEFAULT_THRESHOLD, check_threshold, parse_methods
from llmint8_cli.evaluation import variants, zeroshot


def main(model: str, tasks: str, method: str, cache_dir: str, data_dir: str = "../shared/data", batch_size: str = "32",
         threshold: str = str(DEFAULT_THRESHOLD)) -> None:
    outlier_threshold = check_threshold(float(threshold))
    names = zeroshot.parse_tasks(tasks)
    manager, task_names, _ = zeroshot.task_manager(names, data_dir, zeroshot.use_local_tasks(data_dir))
    device = variants.resolve_device("auto")
    dtype = variants.resolve_dtype("auto", device)
    subject = variants.subject(model, parse_methods(method), outlier_threshold, dtype, device)
    for name, network in subject.variants:
        if name == variants.BASELINE:
            continue  # the generator quantizes lazily: skipping the baseline costs nothing
        folder = variants.cache_folder(cache_dir, subject, name, outlier_threshold, dtype, device)
        with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints; stdout stays JSON
            evaluation = zeroshot.evaluate(network, subject.tokenizer, manager, task_names, None, 0, int(batch_size), str(device), folder)
        print(json.dumps({name: evaluation.results, "batch_size": evaluation.batch_size}))


if __name__ == "__main__":
    if not 5 <= len(sys.argv) <= 8:
        sys.exit("usage: python bench/zeroshot_one_method.py MODEL TASKS METHOD CACHE_DIR [DATA_DIR] [BATCH_SIZE] [THRESHOLD]")
    main(*sys.argv[1:])
