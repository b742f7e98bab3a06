"""The config of class-exclusion early exit (`EarlyExitConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import MethodConfig
from ..errors import HFCompressError

# exit rule -> the method name recorded in `config.compression` (the confidence rule is the max-softmax baseline).
EXIT_RULE_METHODS = {"class_exclusion": "class_exclusion_early_exit", "confidence": "confidence_early_exit"}
DEFAULT_EXIT_POOL_SIZE = 2
# What the threshold search may minimise.
SEARCH_COSTS = ("macs", "latency")
# Batch size of the exit report (inference only, so larger than training's).
REPORT_BATCH_SIZE = 256


@dataclass
class EarlyExitConfig(MethodConfig):
    """Settings of one early-exit run (recorded in the checkpoint's `compression` record).

    Args:
        dataset: `"cifar10"`, a local parquet file or folder, or a Hub dataset.
        tolerance: validation accuracy the exits may lose, as a fraction in [0, 1) (0.005 = half a point).
        exit_rule: `"class_exclusion"`, or `"confidence"` (the max-softmax baseline).
        exit_positions: where the exit heads go (`stem`, `stageI`, `stageI.J`); `None` keeps the model's exits, or
            puts one after the middle and the last block of every stage for a model without exits.
        exit_pool_size: pooled side of each exit head; `None` keeps the model's (2 for a model without exits).
        epochs: training epochs (backbone and heads, or the heads alone without `train_backbone`); 0 searches
            thresholds on the untrained heads.
        lr: peak SGD learning rate (cosine schedule).
        train_backbone: train the backbone and the final classifier jointly with the heads (cross-entropy on the
            final output plus the weighted exit losses), as the paper does. Off: only the heads learn, on the frozen
            network (batch-norm statistics included), so the final classifier, and the accuracy the tolerance is
            measured from, stay exactly the source's, at about a third of the cost per epoch.
        batch_size: training batch size.
        n_val: training images held out for the threshold search.
        train_limit: use a random subset of the training split of this size.
        test_split: split reported at the end (`None` to skip; the figures are then the validation ones).
        test_limit: random subset of the test split.
        step: threshold search step, in (0, 1).
        seed: seed of the subsets and of training.
        cost: what the threshold search minimises: `"macs"` (mean multiply-adds, device-independent), or
            `"latency"` (mean time, from each unit's, head's and the classifier's time per image measured on the
            validation images on this device before the search; the result still reports MACs).
    """

    dataset: str = "cifar10"
    tolerance: float = 0.005
    exit_rule: str = "class_exclusion"
    exit_positions: list[str] | None = None
    exit_pool_size: int | None = None
    epochs: int = 10
    lr: float = 0.01
    train_backbone: bool = True
    batch_size: int = 128
    n_val: int = 5000
    train_limit: int | None = None
    test_split: str | None = "test"
    test_limit: int | None = None
    step: float = 0.01
    seed: int = 0
    cost: str = "macs"

    @property
    def method(self) -> str:
        """The method name of the provenance record, by exit rule."""
        return EXIT_RULE_METHODS[self.exit_rule]

    def validate(self) -> None:
        """Raises `HFCompressError` naming the first bad field; called before any data is loaded or trained on."""
        if not self.dataset:
            raise HFCompressError("dataset (--dataset) must name a dataset, got an empty string")
        if not 0 <= self.tolerance < 1:
            raise HFCompressError(
                f"tolerance (--tolerance) must be in [0, 1) (0.005 = half an accuracy point), got {self.tolerance}"
            )
        if not 0 < self.step < 1:
            raise HFCompressError(f"step (--step), the threshold search step, must be in (0, 1), got {self.step}")
        if self.cost not in SEARCH_COSTS:
            raise HFCompressError(f"cost (--cost) must be one of {list(SEARCH_COSTS)}, got {self.cost!r}")
        if self.exit_rule not in EXIT_RULE_METHODS:
            raise HFCompressError(
                f"exit_rule (--rule) must be one of {sorted(EXIT_RULE_METHODS)}, got {self.exit_rule!r}"
            )
        for name, flag, value, low in (
            ("exit_pool_size", "--exit-pool-size", self.exit_pool_size, 1),
            ("epochs", "--epochs", self.epochs, 0),
            ("batch_size", "--batch-size", self.batch_size, 1),
            ("n_val", "--n-val", self.n_val, 1),
            ("train_limit", "--train-limit", self.train_limit, 1),
            ("test_limit", "--test-limit", self.test_limit, 1),
        ):
            if value is not None and value < low:
                raise HFCompressError(f"{name} ({flag}) must be >= {low}, got {value}")
        if not self.lr > 0:
            raise HFCompressError(f"lr (--lr) must be > 0, got {self.lr}")

    def resolve(self, device=None, model_config: Any = None) -> EarlyExitConfig:
        """A copy with the exits spelled out: those of `model_config` (the ClassExitResNet the heads were attached
        to) when given, else `exit_pool_size` 2 and `exit_positions` left to the model (`None`)."""
        if model_config is not None:
            return dataclasses.replace(
                self, exit_positions=list(model_config.exit_positions), exit_pool_size=model_config.exit_pool_size
            )
        pool = DEFAULT_EXIT_POOL_SIZE if self.exit_pool_size is None else self.exit_pool_size
        positions = None if self.exit_positions is None else list(self.exit_positions)
        return dataclasses.replace(self, exit_positions=positions, exit_pool_size=pool)
