"""Errors that hf-compress raises for bad input; the CLI prints them without a traceback."""

from __future__ import annotations


class HFCompressError(ValueError):
    """Bad input or a failed precondition, with a message that names what is wrong."""
