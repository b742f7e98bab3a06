"""Training of a ClassExitResNet's exits, kept as a resumable stage: backbone and heads jointly (the default, as in
the paper), or the heads alone on the frozen network (`EarlyExitConfig.train_backbone=False`).

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
from ..modeling.class_exit_resnet import ClassExitResNetForImageClassification, exit_loss
from .config import EarlyExitConfig

STAGE_FILE = "hf_compress_stage.json"
HISTORY_FILE = "train_history.json"
# Settings that only matter after training: changing them must not invalidate the trained stage.
POST_TRAINING_FIELDS = ("tolerance", "step", "test_split", "test_limit", "cost")


def exit_head_loss(
    exit_logits: list[torch.Tensor] | tuple[torch.Tensor, ...], labels: torch.Tensor, exit_rule: str
) -> torch.Tensor:
    """The heads' loss with the backbone frozen: the sum of every exit's own loss (`exit_loss`: binary cross-entropy
    per class for class exclusion, cross-entropy for the confidence rule), in float32. The exits are weighted
    equally: with the backbone frozen each loss reaches only its own head, so a weight would only scale its
    learning rate."""
    loss = torch.zeros((), device=labels.device)
    for logits in exit_logits:
        loss = loss + exit_loss(logits, labels, exit_rule)
    return loss


def frozen_exit_features(model: ClassExitResNetForImageClassification, images: torch.Tensor) -> list[torch.Tensor]:
    """The backbone's output at every exit, computed without gradients in eval mode (batch-norm statistics
    untouched) and only as far as the last exit."""
    model.resnet.eval()
    exit_of = {unit: index for index, unit in enumerate(model.exit_units)}
    features: list[torch.Tensor] = [None] * len(model.exit_units)  # type: ignore[list-item]
    hidden = images
    with torch.no_grad():
        for index, unit in enumerate(model.resnet.units()[: max(model.exit_units, default=-1) + 1]):
            hidden = unit(hidden)
            if index in exit_of:
                features[exit_of[index]] = hidden
    return features


def frozen_exit_logits(model, images: torch.Tensor) -> list[torch.Tensor]:
    """Every exit head's logits on the frozen backbone (`model` possibly wrapped for data parallelism).

    In one process the backbone runs without gradients and only as far as the last exit. Wrapped, the call goes
    through the wrapper, so that the heads' gradients are synchronised across processes; the frozen backbone
    records no graph there either (none of its parameters requires a gradient).
    """
    inner = getattr(model, "module", model)
    if inner is model:
        return [head(feature) for head, feature in zip(model.exit_heads, frozen_exit_features(model, images))]
    inner.resnet.eval()  # batch-norm statistics untouched
    return list(model(pixel_values=images, early_exit=False).exit_logits)


def heads_loss_fn(model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`loss_fn` for `train_classifier` with the backbone frozen: `exit_head_loss` of `frozen_exit_logits`."""
    rule = getattr(model, "module", model).config.exit_rule
    return exit_head_loss(frozen_exit_logits(model, images), labels, rule)


def joint_loss_fn(model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`loss_fn` for `train_classifier` training backbone and heads: the model's joint loss (CE on the final output
    plus the weighted exit losses, see `joint_exit_loss`)."""
    return model(pixel_values=images, labels=labels, early_exit=False).loss


def freeze_backbone(model: ClassExitResNetForImageClassification, frozen: bool = True) -> None:
    """Turns gradients off (or back on) for the backbone and the final classifier."""
    for parameter in [*model.resnet.parameters(), *model.classifier.parameters()]:
        parameter.requires_grad_(not frozen)


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


def train_exits(
    model: ClassExitResNetForImageClassification,
    train: ImageClassificationData,
    config: EarlyExitConfig,
    *,
    progress: bool = True,
    accelerator=None,
    loss_fn=None,
    **train_kwargs,
) -> dict[str, Any]:
    """Trains `model` in place: backbone and heads jointly with `config.train_backbone`, else the heads alone.

    With the backbone frozen, its weights, batch-norm statistics and final classifier stay bit-identical, and so does
    the full network's accuracy. `loss_fn` replaces the default (`joint_loss_fn`, or `heads_loss_fn` with the
    backbone frozen); `train_kwargs` go to `train_classifier` (e.g. `resume_dir`, `bf16`, `momentum`). Returns the
    training history as a dict.
    """
    from ..vision import training as vision_training  # looked up on use, so tests can replace train_classifier

    if not config.train_backbone:
        freeze_backbone(model)
    try:
        history = vision_training.train_classifier(
            model, train, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
            loss_fn=loss_fn or (joint_loss_fn if config.train_backbone else heads_loss_fn), seed=config.seed,
            progress=progress,
            desc="joint exit training" if config.train_backbone else "exit head training", accelerator=accelerator,
            **train_kwargs,
        )
    finally:
        freeze_backbone(model, frozen=False)
    return asdict(history)


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
    """`train_exits` as a stage: trains, or loads the stage `partial` saved with the same `settings`.

    Returns the trained model and its training history (`TrainingHistory` as a dict).
    """
    stamp = partial / STAGE_FILE
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        model = ClassExitResNetForImageClassification.from_pretrained(partial)
        return model, json.loads((partial / HISTORY_FILE).read_text())
    history = train_exits(model, train, config, progress=progress, accelerator=accelerator)
    if accelerator is None or accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        (partial / HISTORY_FILE).write_text(json.dumps(history))
        stamp.write_text(json.dumps(settings))  # written last: a stamp means the stage is complete
    return model, history
