"""Writing PrunedCNN checkpoints: safetensors weights, remote code, and a stock image processor.

Every checkpoint is written into a temporary folder beside its destination and moved into place only
when complete, so an interrupted or failed run never leaves a half-written folder that looks finished.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch.nn as nn

from ..errors import HFCompressError
from .data import CIFAR10_MEAN, CIFAR10_STD


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
    output_dir: str | Path,
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
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise HFCompressError(f"{output_dir} already exists (pass --overwrite to replace it)")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    carried: list[str] = []
    try:
        model.save_pretrained(staging, safe_serialization=True)
        image_processor_for(model.config.image_size, mean, std).save_pretrained(staging)
        # Record the backend-neutral class name so any transformers install picks its preferred backend.
        processor_file = staging / "preprocessor_config.json"
        processor = json.loads(processor_file.read_text())
        processor["image_processor_type"] = "ViTImageProcessor"
        processor_file.write_text(json.dumps(processor, indent=2) + "\n")
        for name, content in (extra_json or {}).items():
            (staging / name).write_text(json.dumps(content, indent=2) + "\n")
        for name in carry:
            if (output_dir / name).exists():
                (output_dir / name).rename(staging / name)
                carried.append(name)
        if output_dir.exists():
            # Move the old folder aside first so the destination is never missing a complete model for long.
            trash = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old.", dir=output_dir.parent))
            output_dir.rename(trash / "old")
            staging.rename(output_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(output_dir)
    except BaseException:
        for name in carried:  # never lose what was carried (earlier pruning iterations)
            if (staging / name).exists() and output_dir.exists():
                (staging / name).rename(output_dir / name)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir
