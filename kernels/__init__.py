"""Kernel sources (installed as the package data llmint8_cli.kernels): cpu/*.cpp, cuda/*.cu."""
