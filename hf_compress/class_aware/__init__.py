"""Class-aware CNN pruning (Jiang et al., DATE 2024) and the training of the CNNs it prunes.

`prune(source, output_dir, ClassAwareConfig(...))` and `train(source, output_dir, TrainConfig(...))` are the entry
points; the configs are importable without torch, the entry points are imported on first use.
"""

from __future__ import annotations

from .config import ClassAwareConfig, ImageDataConfig, TrainConfig

_LAZY = {"prune": "api", "train": "api", "TrainingResult": "api", "PruningResult": "record"}


def __getattr__(name: str):
    # `hf-compress --help` reads the configs' defaults; torch is only imported when a run starts.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ClassAwareConfig", "ImageDataConfig", "PruningResult", "TrainConfig", "TrainingResult", "prune", "train"]
