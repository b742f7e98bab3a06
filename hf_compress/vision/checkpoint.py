"""Saving image classifiers of every vision family: the checkpoint plus a stock image processor that matches the
training inputs (the atomic write itself is `hf_compress.checkpoint`'s)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch.nn as nn

from ..checkpoint import prepare_output, save_pretrained_checkpoint
from ..data.images import CIFAR10_MEAN, CIFAR10_STD


def image_processor_for(image_size: int, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD):
    """A stock transformers image processor (resize, rescale, normalise) matching the training inputs."""
    try:
        # The PIL backend needs no torchvision; it is what `ViTImageProcessor` falls back to without it.
        from transformers import ViTImageProcessorPil as processor_class
    except ImportError:  # transformers without separate backends
        from transformers import ViTImageProcessor as processor_class
    return processor_class(
        do_resize=True, size={"height": image_size, "width": image_size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(mean), image_std=list(std),
    )


def save_checkpoint(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    extra_json: dict[str, Any] | None = None,
    overwrite: bool = True,
    carry: Sequence[str] = (),
) -> Path:
    """Saves `model` (safetensors, config with `auto_map`, remote code) and its image processor, atomically.

    Args:
        output_dir: destination folder; replaced as a whole when `overwrite`.
        extra_json: `{file name: JSON-able object}` written beside the model (e.g. a run summary).
        carry: entries of an existing `output_dir` moved into the new one (e.g. `iterations/` of a pruning run).
    """
    processor = image_processor_for(model.config.image_size, mean, std)
    # Record the backend-neutral class name so any transformers install picks its preferred backend.
    processor_json = json.loads(processor.to_json_string())
    processor_json["image_processor_type"] = "ViTImageProcessor"
    return save_pretrained_checkpoint(
        model, output_dir, extra_files={**(extra_json or {}), "preprocessor_config.json": processor_json},
        overwrite=overwrite, carry=carry,
    )


def prepare_vision_output(
    output_dir: str | os.PathLike, *, overwrite: bool, model, dataset: str | None = None, resumable: bool = False
) -> Path:
    """`prepare_output` for a vision command, before any data or model is read.

    The model and the dataset are protected sources when they are local folders: a file source (a config JSON, a
    parquet) only protects itself (an existing file is never taken as OUTPUT), not every folder beside it.
    """
    sources = [str(path) for path in (model, dataset) if isinstance(path, (str, os.PathLike))
               and Path(path).expanduser().is_dir()]
    return prepare_output(output_dir, overwrite=overwrite, sources=sources, resumable=resumable)
