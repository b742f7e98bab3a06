"""The configs of class-aware pruning (`ClassAwareConfig`), of CNN training (`TrainConfig`) and of the image data
both read (`ImageDataConfig`).

This module imports nothing heavy: the CLI reads its defaults from these dataclasses at import time.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig
from ..errors import HFCompressError

REGULARIZERS = ("none", "orthogonal", "l1")
# The weight of each regulariser when none is given (the authors' code).
REGULARIZER_WEIGHTS = {"none": 0.0, "orthogonal": 0.01, "l1": 1e-4}
SCHEDULES = ("cosine", "step", "constant")


def _check(condition: bool, option: str, expected: str, value) -> None:
    """Raises the one-line `HFCompressError` of a bad field: its name, what it must be, what it was."""
    if not condition:
        raise HFCompressError(f"{option} must be {expected}, got {value!r}")


def _check_training(config: "ClassAwareConfig | TrainConfig", epochs_field: str) -> None:
    """The checks of the retraining fields both configs share."""
    epochs = getattr(config, epochs_field)
    _check(isinstance(epochs, int) and epochs >= 0, epochs_field, "an integer >= 0", epochs)
    _check(config.lr > 0, "lr", "> 0", config.lr)
    _check(isinstance(config.batch_size, int) and config.batch_size >= 1, "batch_size", "an integer >= 1", config.batch_size)
    _check(config.weight_decay >= 0, "weight_decay", ">= 0", config.weight_decay)
    _check(config.regularizer in REGULARIZERS, "regularizer", f"one of {REGULARIZERS}", config.regularizer)
    weight = config.regularizer_weight
    _check(weight is None or weight >= 0, "regularizer_weight", ">= 0 (or None for the regulariser's default)", weight)
    _check(isinstance(config.val_size, int) and config.val_size >= 0, "val_size", "an integer >= 0", config.val_size)


@dataclass
class ClassAwareConfig(MethodConfig):
    """Settings of class-aware pruning (Jiang et al., DATE 2024; see `class_aware.loop` and `class_aware.importance`).

    Args:
        accuracy_floor: lowest acceptable validation accuracy, a fraction (0.925).
        max_classes: filters important for at most this many classes are removed.
        images_per_class: images per class scored for the importance.
        used_threshold: a filter is used by an image when its Taylor score reaches this multiple of its layer's mean.
        class_threshold: a filter is important for a class when used by this fraction of the class's images.
        max_fraction: most filters (fraction of all prunable ones) removed per iteration, in (0, 1].
        max_iterations: iterations at most.
        target_macs: stop once the MACs are at or below this count.
        target_macs_reduction: stop once the MACs are reduced by this fraction of the source's, in (0, 1).
        retrain_epochs, lr, batch_size, weight_decay: retraining after each iteration.
        regularizer, regularizer_weight: class-specificity regulariser of the retraining (`regularizers`).
        val_size: train images held out (seed 2023) to check the floor, when `prune` loads the data.
        seed: seeds the data subset and the retraining.
    """

    accuracy_floor: float
    max_classes: int = 1
    images_per_class: int = 32
    used_threshold: float = 1.0
    class_threshold: float = 0.5
    max_fraction: float = 0.2
    max_iterations: int = 10
    target_macs: int | None = None
    target_macs_reduction: float | None = None
    retrain_epochs: int = 20
    lr: float = 0.01
    batch_size: int = 128
    weight_decay: float = 5e-4
    regularizer: str = "l1"
    regularizer_weight: float | None = None
    val_size: int = 5000
    seed: int = 0

    def validate(self) -> None:
        """Raises `HFCompressError` naming the first bad field."""
        _check(0 <= self.accuracy_floor <= 1, "accuracy_floor", "a fraction in [0, 1]", self.accuracy_floor)
        _check(isinstance(self.max_classes, int) and self.max_classes >= 0, "max_classes", "an integer >= 0", self.max_classes)
        _check(0 < self.max_fraction <= 1, "max_fraction", "in (0, 1]", self.max_fraction)
        _check(self.images_per_class >= 1, "images_per_class", ">= 1", self.images_per_class)
        _check(self.used_threshold >= 0, "used_threshold", ">= 0", self.used_threshold)
        _check(0 < self.class_threshold <= 1, "class_threshold", "in (0, 1]", self.class_threshold)
        _check(self.max_iterations >= 0, "max_iterations", ">= 0", self.max_iterations)
        _check(self.target_macs is None or self.target_macs >= 1, "target_macs", ">= 1", self.target_macs)
        reduction = self.target_macs_reduction
        _check(reduction is None or 0 < reduction < 1, "target_macs_reduction", "in (0, 1)", reduction)
        _check(self.target_macs is None or reduction is None, "target_macs", "unset when target_macs_reduction is set",
               self.target_macs)
        _check_training(self, "retrain_epochs")
        # Training may skip validation; pruning cannot: the floor is checked on these held-out images.
        _check(self.val_size >= 1, "val_size", "an integer >= 1 (the accuracy floor is checked on held-out train "
               "images)", self.val_size)

    def mac_target(self, source_macs: int) -> int | None:
        """The MAC count at which the loop stops, for a source network of `source_macs` (None: no target)."""
        if self.target_macs_reduction is not None:
            return int(source_macs * (1 - self.target_macs_reduction))
        return self.target_macs


@dataclass
class TrainConfig(MethodConfig):
    """Settings of `hf-compress train`: SGD with momentum on an image dataset (`vision.training.train_classifier`).

    Args:
        epochs, lr, batch_size, weight_decay: the SGD run.
        schedule: `"cosine"`, `"step"` (x0.1 at 50% and 75%) or `"constant"`.
        regularizer, regularizer_weight: `"none"`, `"orthogonal"` or `"l1"` (class-aware training, `regularizers`).
        val_size: train images held out (seed 2023) and evaluated after every epoch; 0 for none.
        seed: seeds the data subset, the initialisation and the batch order.
    """

    epochs: int = 200
    lr: float = 0.1
    batch_size: int = 128
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    regularizer: str = "none"
    regularizer_weight: float | None = None
    val_size: int = 0
    seed: int = 0

    def validate(self) -> None:
        """Raises `HFCompressError` naming the first bad field."""
        _check_training(self, "epochs")
        _check(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}", self.schedule)


@dataclass
class ImageDataConfig(MethodConfig):
    """Which image data `prune` and `train` load (`data.images.load_image_dataset`).

    Args:
        dataset: a Hub dataset (`uoft-cs/cifar10`), a local parquet file or folder, or the alias `cifar10`.
        eval_split: split evaluated for the report (never for decisions); `""` or None for none.
        limit: use this many training images (drawn at random with the run's seed).
        eval_limit: use this many images of `eval_split`.
        image_column, label_column: column names, found from the features when not given.
    """

    dataset: str = "cifar10"
    eval_split: str | None = "test"
    limit: int | None = None
    eval_limit: int | None = None
    image_column: str | None = None
    label_column: str | None = None

    def validate(self) -> None:
        """Raises `HFCompressError` naming the first bad field."""
        _check(bool(self.dataset), "dataset", "a dataset name or path", self.dataset)
        _check(self.limit is None or self.limit >= 1, "limit", ">= 1", self.limit)
        _check(self.eval_limit is None or self.eval_limit >= 1, "eval_limit", ">= 1", self.eval_limit)
