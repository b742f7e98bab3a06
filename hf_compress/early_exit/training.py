"""Joint training of a ClassExitResNet's backbone and exit heads, kept as a resumable stage.

After training, the model is saved in `.<output>.partial/` with the settings it was trained with; a rerun with the
same settings (after a failure in the search, report or save) loads it instead of training again.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..data.images import ImageClassificationData
from ..modeling.class_exit_resnet import ClassExitResNetForImageClassification
from .config import EarlyExitConfig

STAGE_FILE = "hf_compress_stage.json"
HISTORY_FILE = "train_history.json"
# Settings that only matter after training: changing them must not invalidate the trained stage.
POST_TRAINING_FIELDS = ("tolerance", "step", "test_split", "test_limit")


def joint_loss_fn(model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`loss_fn` for `train_classifier`: CE on the final output + weighted exit losses (see `joint_exit_loss`)."""
    return model(pixel_values=images, labels=labels, early_exit=False).loss


def partial_dir(output_dir: str | Path) -> Path:
    """The folder of the trained stage of a run writing `output_dir`: `.<name>.partial` beside it."""
    output_dir = Path(output_dir)
    return output_dir.parent / f".{output_dir.name}.partial"


def stage_settings(source: str | Path, config: EarlyExitConfig) -> dict[str, Any]:
    """What the trained stage depends on: the source and the resolved config less the post-training fields."""
    settings = {"model": str(source), **config.to_dict()}
    for name in POST_TRAINING_FIELDS:
        settings.pop(name)
    return settings


def train_jointly(
    model: ClassExitResNetForImageClassification,
    train: ImageClassificationData,
    config: EarlyExitConfig,
    partial: Path,
    settings: dict[str, Any],
    *,
    progress: bool = True,
    accelerator=None,
) -> tuple[ClassExitResNetForImageClassification, dict[str, Any]]:
    """Trains backbone and heads together, or loads the stage `partial` saved with the same `settings`.

    Returns the trained model and its training history (`TrainingHistory` as a dict).
    """
    stamp = partial / STAGE_FILE
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        model = ClassExitResNetForImageClassification.from_pretrained(partial)
        return model, json.loads((partial / HISTORY_FILE).read_text())
    from ..vision.training import train_classifier

    trained = train_classifier(
        model, train, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, loss_fn=joint_loss_fn,
        seed=config.seed, progress=progress, desc="joint exit training", accelerator=accelerator,
    )
    history = asdict(trained)
    if accelerator is None or accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        (partial / HISTORY_FILE).write_text(json.dumps(history))
        stamp.write_text(json.dumps(settings))  # written last: a stamp means the stage is complete
    return model, history
