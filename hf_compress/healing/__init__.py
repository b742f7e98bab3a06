"""Healing: distillation of a compressed model from its source (`heal`, `hf-compress heal`, `convert --heal-tokens`)."""

from __future__ import annotations

import importlib

from .config import HealConfig

# The config is light; the trainer (torch, accelerate, peft) is imported on first use, so that the CLI, which reads
# its option defaults from `HealConfig`, starts fast.
_LAZY = {"HealResult": ".trainer", "heal": ".trainer"}

__all__ = ["HealConfig", "HealResult", "heal"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
