"""hf-compress: compress Hugging Face models and publish them as ordinary checkpoints."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hf-compress")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

from .registration import register_families, register_on_import

# Our families load with the stock Auto classes after `import hf_compress`: registered now if transformers is imported,
# else the moment it is (importing it here would cost every command, `--help` included, seconds).
register_on_import()


_LAZY = {"convert": "basis_sharing.api", "BasisSharingConfig": "basis_sharing.config", "CalibrationConfig": "basis_sharing.config"}


def __getattr__(name: str):
    # Heavy entry points are imported on first use so `import hf_compress` stays cheap.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hf_compress' has no attribute {name!r}")


__all__ = ["__version__", "BasisSharingConfig", "CalibrationConfig", "convert", "register_families"]
