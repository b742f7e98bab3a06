"""Class-exclusion early exit for ResNets: exit heads trained jointly with the backbone, thresholds searched on a
held-out split, saved as a ClassExitResNet checkpoint."""

from __future__ import annotations

import importlib

from .config import EarlyExitConfig

# The entry point pulls in torch and the model families: imported on first use, so `hf-compress --help` (which
# reads the config's defaults) stays fast.
_LAZY = {"add_early_exits": ".api", "EarlyExitResult": ".api"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EarlyExitConfig", "EarlyExitResult", "add_early_exits"]
