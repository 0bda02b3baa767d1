"""The llmint8 command line: one file per subcommand, all on the same core."""

from __future__ import annotations

from typing import Annotated

import typer

from llmint8_cli import __version__
from llmint8_cli.cli.bench import bench
from llmint8_cli.cli.common import OneLineErrors
from llmint8_cli.cli.eval_ppl import eval_ppl
from llmint8_cli.cli.eval_zeroshot import eval_zeroshot
from llmint8_cli.cli.export import export
from llmint8_cli.cli.generate import generate
from llmint8_cli.cli.lm_eval import lm_eval
from llmint8_cli.cli.outliers import outliers
from llmint8_cli.cli.quantize import quantize

EXIT_CODES = "Exit codes: 0 success · 2 bad input or refused operation · 3 a result is not finite · 1 internal error · 130 interrupted (143 SIGTERM, 129 SIGHUP)."
EXAMPLES = {
    "quantize": "llmint8 quantize opt-1.3b out/opt-1.3b-int8   ·   llmint8 quantize smollm2-135m out/s | llmint8 eval-ppl --dataset c4",
    "eval-ppl": "llmint8 eval-ppl out/s --dataset wikitext2 --methods all   ·   llmint8 eval-ppl smollm2-135m --max-tokens 10240 | jq .results",
    "eval-zeroshot": "llmint8 eval-zeroshot out/s --tasks piqa,lambada --limit 200",
    "bench": "llmint8 bench --shapes paper --tokens 16,512   ·   llmint8 bench smollm2-135m",
    "outliers": "llmint8 outliers gemma3-270m --samples 8 --plot outliers.png",
    "generate": "llmint8 generate out/s 'Once upon a time' --max-new-tokens 40",
    "export": "llmint8 export out/s out/s-bnb --to bitsandbytes   (then AutoModelForCausalLM.from_pretrained('out/s-bnb') with bitsandbytes)",
    "lm-eval": "llmint8 lm-eval --model hf --model_args pretrained=out/s --tasks piqa --limit 50",
}
COMMANDS = {"quantize": quantize, "eval-ppl": eval_ppl, "eval-zeroshot": eval_zeroshot, "bench": bench, "outliers": outliers, "generate": generate, "export": export}

app = typer.Typer(
    cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="LLM.int8() for Hugging Face causal LMs: quantize, evaluate, benchmark, generate.", epilog=EXIT_CODES,
)
for name, function in COMMANDS.items():
    app.command(name, epilog=f"Example: {EXAMPLES[name]}\n\n{EXIT_CODES}")(function)
app.command(
    "lm-eval", epilog=f"Example: {EXAMPLES['lm-eval']}\n\nExit codes: lm-eval's own.", add_help_option=False,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)(lm_eval)


def show_version(value: bool) -> None:
    if value:
        print(f"llmint8 {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """LLM.int8() for Hugging Face causal LMs: quantize, evaluate, benchmark, generate."""


def main() -> None:
    app()
