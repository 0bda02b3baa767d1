"""llmint8 export OUT DEST --to bitsandbytes"""

from __future__ import annotations

from typing import Annotated

import typer

from llmint8_cli.checkpoint import bitsandbytes
from llmint8_cli.checkpoint.output import parse_size
from llmint8_cli.cli.common import NoVerify, Quiet, command, emit_json, stderr_console, warn
from llmint8_cli.errors import InvalidArgumentError

FORMATS = ("bitsandbytes",)


@command
def export(
    folder: Annotated[str, typer.Argument(help="An llmint8 folder (written by llmint8 quantize).")],
    dest: Annotated[str, typer.Argument(help="Output folder (written atomically).")],
    to: Annotated[str, typer.Option(help="Target format: bitsandbytes (transformers + bitsandbytes 8-bit, as vLLM's bitsandbytes loader reads).")] = "bitsandbytes",
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard, e.g. 2GB.")] = "2GB",
    force: Annotated[bool, typer.Option("--force", help="Replace DEST if it is an earlier llmint8 output or an empty folder.")] = False,
    no_verify: NoVerify = False,
    quiet: Quiet = False,
) -> None:
    """Write an llmint8 folder in another 8-bit format; prints a JSON summary."""
    if to not in FORMATS:
        raise InvalidArgumentError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    console = stderr_console(quiet)
    with console.status(f"writing {dest}"):
        summary = bitsandbytes.export(folder, dest, force, parse_size(max_shard_size), verify=not no_verify)
    for note in summary["notes"]:
        warn(note)
    console.print(f"[green]done[/] {summary['output']}: {summary['layers']} layers, {summary['size_bytes'] / 2**20:.1f} MiB (bitsandbytes 8-bit)")
    emit_json("export", summary["output"], summary)
