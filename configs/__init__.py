"""Configuration files shipped with llmint8 (installed as the package data llmint8_cli.configs)."""
