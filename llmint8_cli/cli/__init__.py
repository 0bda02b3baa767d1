"""The llmint8 command line (Typer)."""

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="LLM.int8() for Hugging Face causal LMs.")


def main() -> None:
    app()
