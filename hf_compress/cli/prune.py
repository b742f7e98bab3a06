"""`hf-compress train` (any PrunedCNN on an image dataset) and `hf-compress prune` (class-aware pruning)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import typer

from ..class_aware.config import REGULARIZER_WEIGHTS, ClassAwareConfig, ImageDataConfig, TrainConfig

_DATASET_HELP = "Hub dataset (uoft-cs/cifar10), local parquet file or folder, or the alias cifar10."


def _default(config_class: type, name: str) -> Any:
    """The default of a config field: the CLI keeps no copy of its own."""
    return next(field.default for field in dataclasses.fields(config_class) if field.name == name)


# Percentages are read only where no fraction could be meant: a floor below 50% is rare, and a value like 1.5
# (1.5%? 150%? a typo of 0.15?) has no reading we could pick safely.
PERCENT_RANGE = (50.0, 100.0)


def _fraction(value: float, option: str) -> float:
    """An accuracy given as a fraction in [0, 1] (0.925) or a percentage in [50, 100] (92.5); anything else is
    refused. A converted percentage is said on stdout, so the reading is never silent."""
    from ..errors import HFCompressError

    low, high = PERCENT_RANGE
    if 0 <= value <= 1:
        return value
    if low <= value <= high:
        fraction = value / 100
        typer.echo(f"{option} {fraction:g} (read {value:g} as a percentage)")
        return fraction
    raise HFCompressError(
        f"{option} must be a fraction in [0, 1] (0.925) or a percentage in [{low:g}, {high:g}] (92.5), got {value:g}; "
        "give a floor below 50% as a fraction"
    )


_REGULARIZER_HELP = ", ".join(f"{name} ({weight:g})" if weight else name for name, weight in REGULARIZER_WEIGHTS.items())
_EVAL_SPLIT_HELP = "('' for none)."


def train_command(
    model: str = typer.Argument(..., help="resnet20/32/44/56/110 or vgg16 (CIFAR networks), a PrunedCNNConfig JSON, "
                                "a PrunedCNN checkpoint or a transformers ResNet checkpoint."),
    output: str = typer.Argument(..., help="Folder for the trained checkpoint."),
    dataset: str = typer.Option(_default(ImageDataConfig, "dataset"), "--dataset", help=_DATASET_HELP),
    epochs: int = typer.Option(_default(TrainConfig, "epochs"), "--epochs"),
    lr: float = typer.Option(_default(TrainConfig, "lr"), "--lr"),
    batch_size: int = typer.Option(_default(TrainConfig, "batch_size"), "--batch-size"),
    weight_decay: float = typer.Option(_default(TrainConfig, "weight_decay"), "--weight-decay"),
    schedule: str = typer.Option(_default(TrainConfig, "schedule"), "--schedule", help="cosine, step (x0.1 at 50% and 75%) or constant."),
    regularizer: str = typer.Option(_default(TrainConfig, "regularizer"), "--regularizer",
                                    help=f"{_REGULARIZER_HELP}: class-aware training."),
    regularizer_weight: Optional[float] = typer.Option(_default(TrainConfig, "regularizer_weight"), "--regularizer-weight"),
    val_size: int = typer.Option(_default(TrainConfig, "val_size"), "--val-size", help="Hold out this many train images (seed 2023) for validation."),
    eval_split: str = typer.Option(_default(ImageDataConfig, "eval_split"), "--eval-split", help=f"Split evaluated at the end {_EVAL_SPLIT_HELP}"),
    limit: Optional[int] = typer.Option(_default(ImageDataConfig, "limit"), "--limit", help="Use this many training images (random, --seed)."),
    eval_limit: Optional[int] = typer.Option(_default(ImageDataConfig, "eval_limit"), "--eval-limit"),
    image_column: Optional[str] = typer.Option(_default(ImageDataConfig, "image_column"), "--image-column"),
    label_column: Optional[str] = typer.Option(_default(ImageDataConfig, "label_column"), "--label-column"),
    seed: int = typer.Option(_default(TrainConfig, "seed"), "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Train a PrunedCNN (or a converted ResNet) on an image classification dataset."""
    from ..class_aware.api import train

    config = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, schedule=schedule,
                         regularizer=regularizer, regularizer_weight=regularizer_weight, val_size=val_size, seed=seed)
    data = ImageDataConfig(dataset=dataset, eval_split=eval_split, limit=limit, eval_limit=eval_limit,
                           image_column=image_column, label_column=label_column)
    result = train(model, output, config, data=data, overwrite=overwrite)
    if "test_accuracy" in result.summary:
        typer.echo(f"{eval_split} accuracy: {result.summary['test_accuracy']:.4f} ({result.summary['test_images']} images)")
    network = result.model
    typer.echo(f"saved {output}: params {network.config.num_parameters / 1e6:.3f}M, MACs {network.config.num_macs / 1e6:.2f}M")


def prune_command(
    model: str = typer.Argument(..., help="A trained PrunedCNN checkpoint or transformers ResNet (folder or Hub id)."),
    output: str = typer.Argument(..., help="Output folder: the pruned checkpoint, with iterations/ for resuming."),
    dataset: str = typer.Option(_default(ImageDataConfig, "dataset"), "--dataset", help=_DATASET_HELP),
    accuracy_floor: float = typer.Option(..., "--accuracy-floor", help="Lowest acceptable validation accuracy: a "
                                         "fraction (0.92) or a percentage from 50 to 100 (92)."),
    max_classes: int = typer.Option(_default(ClassAwareConfig, "max_classes"), "--max-classes", help="Remove filters important for at most this many classes."),
    images_per_class: int = typer.Option(_default(ClassAwareConfig, "images_per_class"), "--images-per-class"),
    used_threshold: float = typer.Option(_default(ClassAwareConfig, "used_threshold"), "--used-threshold", help="A filter is used by an image "
                                         "when its Taylor score reaches this multiple of its layer's mean."),
    class_threshold: float = typer.Option(_default(ClassAwareConfig, "class_threshold"), "--class-threshold",
                                          help="Important for a class when used by this fraction of its images."),
    max_fraction: float = typer.Option(_default(ClassAwareConfig, "max_fraction"), "--max-fraction",
                                       help="Most filters (fraction of all prunable) removed per iteration."),
    max_iterations: int = typer.Option(_default(ClassAwareConfig, "max_iterations"), "--max-iterations"),
    target_macs_reduction: Optional[float] = typer.Option(_default(ClassAwareConfig, "target_macs_reduction"), "--target-macs-reduction",
                                                          help="Stop once MACs are reduced by this fraction."),
    retrain_epochs: int = typer.Option(_default(ClassAwareConfig, "retrain_epochs"), "--retrain-epochs"),
    lr: float = typer.Option(_default(ClassAwareConfig, "lr"), "--lr"),
    batch_size: int = typer.Option(_default(ClassAwareConfig, "batch_size"), "--batch-size"),
    weight_decay: float = typer.Option(_default(ClassAwareConfig, "weight_decay"), "--weight-decay"),
    regularizer: str = typer.Option(_default(ClassAwareConfig, "regularizer"), "--regularizer",
                                    help=f"{_REGULARIZER_HELP}; the default was chosen by measurement, see docs."),
    regularizer_weight: Optional[float] = typer.Option(_default(ClassAwareConfig, "regularizer_weight"), "--regularizer-weight"),
    val_size: int = typer.Option(_default(ClassAwareConfig, "val_size"), "--val-size", help="Train images held out (seed 2023) to check the floor."),
    eval_split: str = typer.Option(_default(ImageDataConfig, "eval_split"), "--eval-split",
                                   help=f"Split reported after each iteration {_EVAL_SPLIT_HELP}"),
    limit: Optional[int] = typer.Option(_default(ImageDataConfig, "limit"), "--limit"),
    eval_limit: Optional[int] = typer.Option(_default(ImageDataConfig, "eval_limit"), "--eval-limit"),
    image_column: Optional[str] = typer.Option(_default(ImageDataConfig, "image_column"), "--image-column"),
    label_column: Optional[str] = typer.Option(_default(ImageDataConfig, "label_column"), "--label-column"),
    revision: Optional[str] = typer.Option(None, "--revision"),
    seed: int = typer.Option(_default(ClassAwareConfig, "seed"), "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUTPUT that holds no resumable run."),
) -> None:
    """Class-aware pruning (DATE 2024): remove filters that matter to few classes, retrain, repeat; resumes OUTPUT."""
    from ..class_aware.api import prune
    from ..class_aware.record import result_line, summary_table

    config = ClassAwareConfig(
        accuracy_floor=_fraction(accuracy_floor, "--accuracy-floor"), max_classes=max_classes,
        images_per_class=images_per_class, used_threshold=used_threshold, class_threshold=class_threshold,
        max_fraction=max_fraction, max_iterations=max_iterations, target_macs_reduction=target_macs_reduction,
        retrain_epochs=retrain_epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, regularizer=regularizer,
        regularizer_weight=regularizer_weight, val_size=val_size, seed=seed,
    )
    data = ImageDataConfig(dataset=dataset, eval_split=eval_split, limit=limit, eval_limit=eval_limit,
                           image_column=image_column, label_column=label_column)
    result = prune(model, output, config, data=data, revision=revision, overwrite=overwrite)
    typer.echo(summary_table(result.rows))
    typer.echo(result_line(result, output))


def register(app: typer.Typer) -> None:
    """Adds `train` and `prune` to `app`."""
    app.command("train")(train_command)
    app.command("prune")(prune_command)
