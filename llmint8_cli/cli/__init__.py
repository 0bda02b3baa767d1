"""The llmint8 command line: one file per subcommand, all on the same core."""

from __future__ import annotations

import typer

from llmint8_cli.cli.bench import bench
from llmint8_cli.cli.common import OneLineErrors
from llmint8_cli.cli.eval_ppl import eval_ppl
from llmint8_cli.cli.eval_zeroshot import eval_zeroshot
from llmint8_cli.cli.outliers import outliers
from llmint8_cli.cli.quantize import quantize

app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="LLM.int8() for Hugging Face causal LMs: quantize, evaluate, benchmark.")
app.command("quantize")(quantize)
app.command("eval-ppl")(eval_ppl)
app.command("eval-zeroshot")(eval_zeroshot)
app.command("bench")(bench)
app.command("outliers")(outliers)


def main() -> None:
    app()
