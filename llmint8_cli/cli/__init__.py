"""The llmint8 command line: one file per subcommand, all on the same core."""

from __future__ import annotations

import typer

from llmint8_cli.cli.bench import bench
from llmint8_cli.cli.eval_ppl import eval_ppl
from llmint8_cli.cli.outliers import outliers
from llmint8_cli.cli.quantize import quantize
from llmint8_cli.cli.common import fail

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="LLM.int8() for Hugging Face causal LMs: quantize, evaluate, benchmark.")
app.command("quantize")(quantize)
app.command("eval-ppl")(eval_ppl)
app.command("bench")(bench)
app.command("outliers")(outliers)


def _not_built(name: str, issue: str):
    def command() -> None:
        fail(f"'{name}' is not built yet ({issue}); see README.md for what works today")

    command.__doc__ = f"(not built yet) {issue}"
    return command


for _name, _issue in (
    ("eval-zeroshot", "lm-eval zero-shot tasks on int8 models"),
):
    app.command(_name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(_not_built(_name, _issue))


def main() -> None:
    app()
