"""Errors that hf-compress raises for bad input; the CLI prints them without a traceback."""

from __future__ import annotations


class HFCompressError(ValueError):
    """Bad input or a failed precondition, with a message that names what is wrong."""


def error_line(err: BaseException) -> str:
    """`Class: first line of the message`: a library's exception inside one of our one-line errors."""
    return f"{err.__class__.__name__}: {(str(err).strip().splitlines() or [''])[0]}"
