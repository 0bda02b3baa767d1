"""`python -m llmint8_cli` runs the command line."""

from llmint8_cli.cli import main

main()
