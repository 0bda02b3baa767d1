"""What every subcommand shares: JSON on stdout, rich on stderr, one-line errors with exit codes.

Exit codes: 0 success, 2 bad input or a refused operation (an LLMInt8Error), 3 a requested
result is not finite (null in the JSON, with the reason), 1 an unexpected internal error,
130 interrupted (143 SIGTERM, 129 SIGHUP). Set LLMINT8_DEBUG=1 to see the traceback of an internal error.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import json
import logging
import math
import os
import signal
import stat
import sys
import warnings
from collections.abc import Callable
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from typer.core import TyperGroup

try:
    from typer._click import exceptions as click_errors  # typer >= 0.24 carries its own click
except ImportError:
    from click import exceptions as click_errors

from llmint8_cli import cache, distributed, models, placement
from llmint8_cli.errors import InvalidArgumentError, LLMInt8Error, one_line

EXIT_BAD_INPUT = 2
EXIT_NOT_FINITE = 3

# Options several commands share, declared once.
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="Nothing on stderr.")]
NoVerify = Annotated[bool, typer.Option("--no-verify", help="Skip the sha256 check of an llmint8 folder against its manifest.")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Run the Python code a model folder names for its own classes (auto_map); "
                                               "without it such a folder is loaded with transformers' built-in classes, or refused where it has none.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto (the whole model on one device; --device-map spreads it).")]
DeviceMap = Annotated[str | None, typer.Option(help=placement.DEVICE_MAP_HELP, show_default=False)]
MaxMemory = Annotated[str | None, typer.Option(help=placement.MAX_MEMORY_HELP, show_default=False)]
OffloadFolder = Annotated[str | None, typer.Option(help=placement.OFFLOAD_HELP, show_default=False)]
ComputeDtype = Annotated[str, typer.Option("--dtype", help="Compute dtype: fp32, fp16, bf16, or auto: fp16 on GPU; on CPU fp32 for evaluation, and for bench bf16 where the CPU has native bf16 matmul.")]
DataDir = Annotated[str | None, typer.Option(help="Local data folder (layout of shared/data); default $LLMINT8_DATA_DIR, else shared/data in or beside the working directory or the llmint8 checkout, else the Hub.")]
Threshold = Annotated[float | None, typer.Option(help="Outlier threshold |x| of the decomposition (default: the method's own, 6.0; 60 for llm.int8-rotate).", show_default=False)]
CalibSamples = Annotated[int, typer.Option(min=0, help="Calibration windows that find the outlier columns stored in 16-bit (the same calibration in quantize and in evaluations on the fly); 0 = run-time detection only.")]
CalibSeqLen = Annotated[int, typer.Option(min=2, help="Tokens per calibration window.")]
SmoothAlpha = Annotated[float, typer.Option(min=0.0, max=1.0, help="llm.int8-smooth: how much of each input feature's calibrated range moves into W (SmoothQuant's alpha).")]
OutlierRatio = Annotated[float | None, typer.Option(help="Calibration also stores the columns of systematic features: hidden dimensions whose max |x| is at least R times their "
                                                   "layer's median column max in 25 % of the layers or more (paper §4), whatever their size. Default: 16 for llm.int8-rotate, "
                                                   "0 (the threshold alone) for the others.", show_default=False)]
RotationBlock = Annotated[int, typer.Option(help="llm.int8-rotate: width of the Hadamard blocks (4, 16, 64, 256 or 1024); wider spreads a large value thinner.")]
METHODS_HELP = ("Comma-separated methods, 'paper' (Table 1's nine) or 'all' (those, llm.int8-smooth and llm.int8-rotate); the 16-bit baseline is always included. "
                "For a 16-bit MODEL; a quantized folder is evaluated as stored, and asking it for another method or threshold is an error.")
CalibDataset = Annotated[str, typer.Option(help="Calibration text: wikitext2-train (falls back to C4 offline), wikitext2, ptb, c4 or a file; never the evaluation text.")]
PIPED_MODEL_HELP = "Omitted: the model of the llmint8 JSON document on stdin (a pipe from quantize or an evaluation)"
Model = Annotated[str | None, typer.Argument(help=f"An llmint8 folder (evaluated as stored) or a 16-bit model: folder, .gguf, alias, short name (opt-1.3b) or Hub id. {PIPED_MODEL_HELP}, else the default model.", show_default=False)]


LOG_WIDTH = 160  # a stderr that is a file or a pipe has no width; rich would assume 80 and cut table cells


def stderr_console(quiet: bool = False) -> Console:
    """Lines never wrapped (a path stays greppable); tables as wide as a log needs off a terminal."""
    console = Console(stderr=True, quiet=quiet, soft_wrap=True)
    if not console.is_terminal:
        console.width = LOG_WIDTH
    return console


def print_table(console: Console, title: str, columns: list[str], rows: list[list[str]], optional: tuple[str, ...] = ()) -> None:
    """A right-aligned table whose cells never fold: where it does not fit the width (80 columns
    on a small terminal), the `optional` columns are left out, in that order, until it fits."""
    from rich import box
    from rich.table import Table

    shown = list(columns)
    while True:
        table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1))
        for column in shown:
            table.add_column(column, justify="right", no_wrap=True)
        for row in rows:
            table.add_row(*(cell for column, cell in zip(columns, row) if column in shown))
        left = [column for column in optional if column in shown]
        if not left or console.measure(table, options=console.options.update_width(10**6)).maximum <= console.width:
            break
        shown.remove(left[0])
    console.print(table)


def json_safe(value):
    """NaN and Inf as null: a bare NaN is not JSON, and a pipeline's parser would reject the document."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def emit_json(command: str, model: str | None, document: dict) -> None:
    """One JSON document on stdout; it opens with the command and the model, for jq and for the next command in a pipe.

    A stdout that is closed, a pipe whose reader is gone or a full disk is a one-line error: the
    result was not delivered, so the exit code must not say it was.
    """
    head = {"command": command, "model": model}
    text = json.dumps(json_safe({**head, **document}), indent=2, allow_nan=False) + "\n"
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except (AttributeError, OSError, ValueError) as exc:  # None (closed at start), EPIPE, ENOSPC, closed file
        raise InvalidArgumentError(f"cannot write the JSON result to stdout: {stdout_lost(exc)}") from None


def stdout_lost(exc: Exception) -> str:
    """Why a write to stdout failed; later flushes (at exit) then go nowhere, silently, instead of a traceback."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return "it is closed" if sys.stdout is None or isinstance(exc, (AttributeError, ValueError)) else (exc.strerror or str(exc))


def stdin_is_piped() -> bool:
    """A pipe or a redirected file; not a terminal, /dev/null, or a test runner's fake stream."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


STDIN_LIMIT = 1 << 20  # characters: an llmint8 JSON document is a few KiB; more is not one


def model_from_stdin(text: str) -> str:
    """The model an earlier llmint8 command hands on: quantize's output folder, else its model."""
    if len(text) > STDIN_LIMIT:
        raise InvalidArgumentError(f"stdin holds more than {STDIN_LIMIT >> 20} MiB: not an llmint8 JSON document; pass MODEL instead")
    if not text.strip():
        raise InvalidArgumentError("stdin is empty: the command before this one in the pipe wrote no JSON (did it fail?)")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"stdin is not an llmint8 JSON document (not JSON: {exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise InvalidArgumentError("stdin is not an llmint8 JSON document (nested deeper than one is)") from None
    if not isinstance(document, dict) or not isinstance(document.get("command"), str):
        raise InvalidArgumentError("stdin is not an llmint8 JSON document (no \"command\" field); pass MODEL instead")
    model = document.get("output") if document["command"] == "quantize" else document.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgumentError(f"the {document['command']} document on stdin names no model; pass MODEL instead")
    return model


def choose_model(given: str | None, console: Console, default: str | None = None) -> str | None:
    """MODEL as typed; else the one a pipe hands on; else `default`, said on stderr."""
    if given:
        return given
    if stdin_is_piped():
        console.print("reading MODEL from the JSON document on stdin")
        try:
            text = sys.stdin.read(STDIN_LIMIT + 1)
        except UnicodeDecodeError:
            raise InvalidArgumentError("stdin is not an llmint8 JSON document (bytes that are not UTF-8 text); pass MODEL instead") from None
        except OSError as exc:
            raise InvalidArgumentError(f"cannot read stdin ({exc.strerror or exc}); pass MODEL instead") from None
        model = model_from_stdin(text)
        console.print(f"model from stdin: {model}")
        return model
    if default is not None:
        console.print(f"no MODEL given: using the default model {default}")
    return default


class LoggedProgress(Progress):
    """A Progress for a stderr that is a file (a log of a long run), where rich draws no bar:
    a plain line each time a task passes another tenth of its total."""

    def advance(self, task_id, advance: float = 1) -> None:
        before = self._tenths(task_id)
        super().advance(task_id, advance)
        self._log_if_passed(task_id, before)

    def update(self, task_id, **changes) -> None:
        before = self._tenths(task_id)
        super().update(task_id, **changes)
        self._log_if_passed(task_id, before)

    def _tenths(self, task_id) -> int:
        task = self._tasks[task_id]
        return int(10 * min(task.completed, task.total) // task.total) if task.total else 0

    def _log_if_passed(self, task_id, before: int) -> None:
        tenths = self._tenths(task_id)
        if tenths > before:
            task = self._tasks[task_id]
            self.console.print(f"{task.description.strip()}: {task.completed:g}/{task.total:g} ({100 * task.completed / task.total:.0f} %) after {task.elapsed or 0.0:.0f} s")


def progress_bar(console: Console) -> Progress:
    """A rich bar on a terminal; on a redirected stderr, a line per tenth of each task instead."""
    kind = Progress if console.is_terminal else LoggedProgress
    return kind(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    )


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    print(f"llmint8: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def warn(message: str) -> None:
    """Shown even with --quiet: a warning says the result differs from what was asked (once per run: by rank 0 under torchrun)."""
    if distributed.is_main():
        print(f"llmint8: warning: {message}", file=sys.stderr)


class OneLineErrors(TyperGroup):
    """Usage and value errors (`--batch-size 0`, a missing argument) as one `llmint8: error:` line, exit 2.

    Typer would draw a usage box; a shell pipeline wants one line it can grep. Help on a bare
    `llmint8` stays as it is.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, "llmint8", complete_var, standalone_mode=False, **extra)  # also under python -m
        except click_errors.ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # a bare `llmint8`: the help, as before
                exc.show()
                sys.exit(exc.exit_code)
            where = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) is not None else ""
            print(f"llmint8: error: {exc.format_message()}{where}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        except OSError as exc:  # the help or the version into a full or closed stdout (a command's own errors get here only to be debugged)
            if os.environ.get("LLMINT8_DEBUG"):
                raise
            print(f"llmint8: error: cannot write to stdout: {stdout_lost(exc)}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        sys.exit(code if isinstance(code, int) else 0)


def quiet_libraries() -> None:
    """Keep library chatter (transformers' progress bars and warnings) off the user's stderr."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    # the peers warn on import (torchao also through transformers); accelerate on every placed load ("offloaded to the disk": our placement line says it)
    for name in ("lm_eval", "torchao", "torch.utils._pytree", "bitsandbytes", "accelerate", "kernels"):  # kernels: bitsandbytes asks the Hub for its kernels
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from tqdm.auto import tqdm
        from transformers import modeling_gguf_pytorch_utils as gguf_loader
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        gguf_loader.tqdm = functools.partial(tqdm, disable=True)  # it imports tqdm directly
    except ImportError:
        pass


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is so that cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_like_interrupt():
    """SIGTERM (timeout, systemd, docker stop) and SIGHUP unwind like SIGINT, so temporary files go."""
    signals = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    try:
        previous = {s: signal.signal(s, _raise_terminated) for s in signals}
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


_AT_END: contextvars.ContextVar[contextlib.ExitStack] = contextvars.ContextVar("llmint8_at_end")


def at_end(callback: Callable[[], None]) -> None:
    """Run `callback` when the command ends, however it ends (an error, Ctrl-C, SIGTERM)."""
    _AT_END.get().callback(callback)


def command(function: Callable) -> Callable:
    """Turn library errors into `llmint8: error: ...` and an exit code, never a traceback; a
    command's `--trust-remote-code` holds for every model it loads (models.trusting_remote_code),
    and what it registered with `at_end` runs as it ends."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        quiet_libraries()
        try:
            with (terminate_like_interrupt(), models.trusting_remote_code(kwargs.get("trust_remote_code", False)), cache.quiet(kwargs.get("quiet", False)),
                  contextlib.ExitStack() as cleanup):
                token = _AT_END.set(cleanup)
                try:
                    return function(*args, **kwargs)
                finally:
                    _AT_END.reset(token)
        except typer.Exit:
            raise
        except LLMInt8Error as exc:
            fail(str(exc))
        except Terminated as exc:
            fail(f"terminated by {signal.Signals(exc.signum).name}", 128 + exc.signum)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as exc:  # an internal error: still one line unless debugging
            if os.environ.get("LLMINT8_DEBUG"):
                raise
            fail(f"internal error: {type(exc).__name__}: {one_line(exc)} (LLMINT8_DEBUG=1 shows the traceback)", 1)

    return wrapper


def given_options(ctx: typer.Context) -> frozenset[str]:
    """The options the user typed (not defaults): an option that cannot apply to what MODEL turns
    out to be (a stored llmint8 folder, a bitsandbytes folder) is refused, never silently dropped."""
    try:
        from typer._click.core import ParameterSource  # typer >= 0.24 carries its own click
    except ImportError:
        from click.core import ParameterSource

    return frozenset(name for name in ctx.params if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT))


def chosen_placement(ctx: typer.Context, device: str, device_map: str | None, max_memory: str | None, offload_folder: str | None
                     ) -> tuple[placement.Placement | None, torch.device]:
    """(the placement asked for, the device inputs start on): --device-map, or the one --device."""
    from llmint8_cli.evaluation.variants import resolve_device

    chosen = placement.for_this_run(placement.parse(device_map, max_memory, offload_folder), at_end)
    if chosen is None:
        return None, resolve_device(device)
    if "device" in given_options(ctx):
        raise InvalidArgumentError("--device puts the whole model on one device and --device-map spreads it: give one of them")
    return chosen, chosen.main_device()


def evaluation_placement(ctx: typer.Context, device: str, device_map: str | None, max_memory: str | None, offload_folder: str | None
                         ) -> tuple[placement.Placement | None, torch.device]:
    """chosen_placement for an evaluation, which may run under torchrun: then this process joins
    the run on its own device, and a placement (one model over several devices) is refused."""
    placed, run_device = chosen_placement(ctx, device, device_map, max_memory, offload_folder)
    if placed is not None and distributed.active():
        raise InvalidArgumentError("--device-map spreads one model over devices; under torchrun each process loads its own: use one or the other")
    run_device = distributed.device_of_rank(run_device)
    distributed.start(run_device)
    return placed, run_device


def report_placement(console: Console, label: str, model) -> dict | None:
    """A placed model's map: one line on stderr, and its description for the JSON (None if not placed)."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return None
    console.print(placement.line(label, device_map))
    return placement.describe(device_map)
