"""llmint8 lm-eval ARGS...: lm-evaluation-harness's own command line, llmint8 folders included.

lm-eval 0.4 discovers no model plugins, so this command registers them and then runs lm-eval:
`--model hf --model_args pretrained=OUT` loads an llmint8 folder through transformers (the
registered quantizer), `--model llmint8 --model_args path=OUT` through llmint8_cli.load. With the
Hub unreachable, the tasks we ship local configs for (configs/lm_eval) read the local data files.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from unittest import mock
from pathlib import Path

import typer

from llmint8_cli import models
from llmint8_cli.cli.common import command
from llmint8_cli.errors import InvalidArgumentError, LLMInt8Error, one_line
from llmint8_cli.evaluation import zeroshot

LOCAL_TASKS = {spec.builtin: name for name, spec in zeroshot.TASKS.items()}


def option_value(args: list[str], option: str) -> tuple[int, str] | None:
    """(index, value) of `--option value` or `--option=value` in lm-eval's arguments."""
    for index, arg in enumerate(args):
        if arg == option and index + 1 < len(args):
            return index + 1, args[index + 1]
        if arg.startswith(option + "="):
            return index, arg.split("=", 1)[1]
    return None


PICKLES = "which can run code when read back"


def refuse_pickled_caches(config) -> None:
    """lm-eval's use_cache (a SqliteDict of pickles) and cache_requests (dill files) read pickles
    back, and a crafted one runs code; llmint8 keeps answers as data (eval-zeroshot --cache-dir).

    Checked on the configuration lm-eval resolved, so every spelling is caught: `-c DIR`, an
    abbreviated `--use_ca`, a bare `--cache_requests`, or the keys in a `--config` YAML."""
    if config.use_cache:
        raise InvalidArgumentError(f"--use_cache (or use_cache in --config) stores lm-eval's answers as pickles, {PICKLES}; "
                                   "llmint8 eval-zeroshot --cache-dir keeps them as JSON lines instead")
    requests = config.cache_requests if isinstance(config.cache_requests, dict) else {"cache_requests": config.cache_requests}
    if requests.get("cache_requests") or requests.get("rewrite_requests_cache"):
        raise InvalidArgumentError(f"--cache_requests (or cache_requests in --config) stores lm-eval's requests as pickles, {PICKLES}; leave it out")


def never_unpickled(*args, **kwargs):
    """Stands in for lm-eval's CachingLM, should any path reach it unchecked."""
    raise InvalidArgumentError(f"lm-eval tried to read a pickled cache, {PICKLES}; refused")


def no_request_cache(file_name: str, cache: bool = False):
    """Stands in for lm-eval's load_from_cache, which every task calls: nothing cached, unless asked to read one."""
    if cache:
        never_unpickled()


@contextlib.contextmanager
def without_pickled_caches():
    """lm-eval's configuration checked as it is resolved (refuse_pickled_caches), and its two
    pickle readers replaced, while lm-eval runs."""
    from lm_eval.config.evaluate_config import EvaluatorConfig

    resolve = EvaluatorConfig.from_cli.__func__

    def checked(cls, namespace):
        config = resolve(cls, namespace)
        refuse_pickled_caches(config)
        return config

    with (mock.patch.object(EvaluatorConfig, "from_cli", classmethod(checked)), mock.patch("lm_eval.api.model.CachingLM", never_unpickled),
          mock.patch("lm_eval.api.task.load_from_cache", no_request_cache)):
        yield


def with_local_tasks(args: list[str], folder: Path) -> tuple[list[str], str | None]:
    """Offline: the known tasks renamed to their `_local` configs (written to `folder`) and `--include_path` added."""
    found = option_value(args, "--tasks")
    if found is None or models.hub_online() or option_value(args, "--include_path"):
        return args, None
    index, value = found
    names = [n.strip() for n in value.split(",") if n.strip()]
    ours = [LOCAL_TASKS[n] for n in names if n in LOCAL_TASKS]
    if not ours:
        return args, None
    base = zeroshot.write_local_configs(ours, None, folder)
    renamed = ",".join(f"{n}_local" if n in LOCAL_TASKS else n for n in names)
    args = list(args)
    args[index] = renamed if args[index] == value else f"--tasks={renamed}"
    return [*args, "--include_path", str(folder)], f"offline: {', '.join(n for n in names if n in LOCAL_TASKS)} read local files under {base}"


def on_this_machine(args: list[str]) -> list[str]:
    """No --device on a machine without CUDA: cpu, where lm-eval would try cuda."""
    import torch

    if option_value(args, "--device") is None and not torch.cuda.is_available():
        return [*args, "--device", "cpu"]
    return args


@command
def lm_eval(ctx: typer.Context) -> None:
    """lm-eval's command line (`lm_eval ARGS`) with llmint8 folders loadable; `llmint8 lm-eval -h` is lm-eval's help.

    Our errors (a bad llmint8 folder) and lm-eval's own (a bad argument it raises on) end as one
    line, exit 2; lm-eval's usage errors keep lm-eval's own usage message and exit code.
    """
    try:
        importlib.import_module("llmint8_cli.evaluation.lm_eval_plugin")  # registers --model llmint8
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:
        raise InvalidArgumentError(f"lm-eval is not installed ({exc.name}); pip install 'llmint8[eval]'") from None
    with zeroshot.task_configs() as folder, without_pickled_caches():  # removed at the end, also on Ctrl-C or SIGTERM
        args, note = with_local_tasks(list(ctx.args), folder)
        if note:
            print(f"llmint8: {note}", file=sys.stderr)
        sys.argv = ["lm_eval", *on_this_machine(args)]
        try:
            cli_evaluate()
        except (LLMInt8Error, KeyboardInterrupt, SystemExit):
            raise
        except (ValueError, TypeError, KeyError, FileNotFoundError, AssertionError) as exc:  # lm-eval's checks of its arguments
            raise InvalidArgumentError(f"lm-eval: {one_line(exc)}") from None
