"""Basis Sharing (Wang et al., ICLR 2025) for Llama-family LLMs: `convert` a checkpoint into a SharedBasisLlama one."""

from __future__ import annotations

import importlib

# The configs are light; the converter's modules are imported on first use, so that the CLI, which reads its
# defaults from the configs, starts fast.
_LAZY = {"BasisSharingConfig": ".config", "CalibrationConfig": ".config", "ConversionResult": ".api", "convert": ".api"}

__all__ = ["BasisSharingConfig", "CalibrationConfig", "ConversionResult", "convert"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
