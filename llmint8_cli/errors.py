"""Typed exceptions: the library raises these, the CLI turns them into one-line errors (exit 2)."""


class LLMInt8Error(Exception):
    """Base class for every error llmint8 reports to a user as a one-line message."""


class InvalidArgumentError(LLMInt8Error, ValueError):
    """A method name, threshold, shape or dtype the operation cannot accept."""


class InvalidWeightError(LLMInt8Error, ValueError):
    """A weight tensor that cannot be quantized (wrong dtype or shape, NaN or Inf)."""


class ModelLoadError(LLMInt8Error):
    """A model source that cannot be read (missing, corrupt, unsupported, offline Hub id)."""


class CheckpointError(LLMInt8Error):
    """An llmint8 checkpoint that is malformed or fails verification."""


class OutputExistsError(LLMInt8Error):
    """An output path that exists already and was not to be overwritten."""


class DataError(LLMInt8Error):
    """Evaluation data that is missing, empty or too short for the protocol."""


MESSAGE_CHARACTERS = 300


def one_line(exc: BaseException) -> str:
    """A library exception's message on one line (its lines joined, cut at 300 characters; its
    type name if it has none): a one-line error must stay one line without losing its point."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= MESSAGE_CHARACTERS else text[: MESSAGE_CHARACTERS - 3] + "..."


class ConversionError(LLMInt8Error):
    """A converted model that does not compute what its 16-bit model computes (nothing is written)."""
