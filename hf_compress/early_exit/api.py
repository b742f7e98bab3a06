"""`add_early_exits`: attach exit heads to a ResNet, train them, search thresholds, save a ClassExitResNet.

Stages: (1) load the source (a transformers ResNet, an unpruned ResNet PrunedCNN or a ClassExitResNet) and attach
heads; (2) train backbone and heads jointly (or the heads alone on the frozen backbone, `train_backbone=False`) on the
training split minus a held-out validation split (kept in `.<output>.partial/`, so a rerun with the same settings
resumes at the search); (3) search the thresholds on the validation split; (4) report real batched early-exit
inference on the test split; (5) write the checkpoint with its provenance record atomically.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.images import ImageClassificationData
from ..data.images import load_splits as load_image_splits
from ..errors import HFCompressError
from ..modeling.class_exit_resnet import ClassExitResNetForImageClassification
from ..provenance import DataRef, SourceRef, provenance
from .config import EarlyExitConfig
from .heads import check_exit_source, load_exit_model
from .latency import measure_exit_costs
from .report import exit_report
from .search import ThresholdSearch, collect_exit_scores, search_thresholds
from .training import partial_dir, stage_settings, train_jointly


@dataclass
class EarlyExitResult:
    """What `add_early_exits` measured, on the test split (or on the validation split when there is none).

    Attributes:
        thresholds: one per exit (class-exclusion betas, or confidence thresholds for the baseline rule).
        accuracy_full / accuracy_early_exit: accuracy of the final classifier alone / of early-exit inference.
        macs_full / mean_macs: MACs of the whole network / mean MACs per image with early exit.
        exit_histogram: share of images leaving at each exit and at `"final"` (`None` without a test split).
        dataset: `"<dataset name>:<split>"` the figures above were measured on.
        config: the resolved config the model was made with.
        provenance: the record written into the checkpoint's `config.compression`.
    """

    thresholds: list[float]
    accuracy_full: float
    accuracy_early_exit: float
    macs_full: int
    mean_macs: float
    exit_histogram: dict[str, float] | None
    dataset: str
    config: EarlyExitConfig
    provenance: dict[str, Any]


def load_splits(
    config: EarlyExitConfig,
) -> tuple[ImageClassificationData, ImageClassificationData, ImageClassificationData | None]:
    """Training and validation splits (the protocol's hold-out) and the test split when asked."""
    return load_image_splits(config.dataset, val_size=config.n_val, eval_split=config.test_split, seed=config.seed,
                             limit=config.train_limit, eval_limit=config.test_limit, val_option="n_val (--n-val)")


def attach_exits(
    source: str | Path, config: EarlyExitConfig, train: ImageClassificationData, device=None
) -> tuple[ClassExitResNetForImageClassification, EarlyExitConfig]:
    """Loads `source` with the exits of `config`, labelled as `train`; returns it and the config resolved on it."""
    model = load_exit_model(
        source, exit_positions=config.exit_positions, exit_pool_size=config.exit_pool_size, exit_rule=config.exit_rule
    )
    if model.config.num_labels != train.num_classes:
        raise HFCompressError(
            f"{source} classifies {model.config.num_labels} classes (its heads have {model.config.num_labels} outputs) "
            f"but the dataset has {train.num_classes}; fine-tune it on this dataset first (hf-compress train)"
        )
    if model.config.id2label != train.id2label():
        model.config.id2label, model.config.label2id = train.id2label(), {n: i for i, n in train.id2label().items()}
    model.config.image_size = train.image_size[0]
    return model, config.resolve(device, model.config)


def add_early_exits(
    source: str | Path,
    output_dir: str | Path,
    config: EarlyExitConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    accelerator=None,
) -> EarlyExitResult | None:
    """Turns the ResNet `source` (folder or Hub id) into a ClassExitResNet checkpoint in `output_dir`.

    Under `accelerate launch` every process trains its shard; the search, report and save run on the main process,
    and the other processes return `None`.
    """
    from accelerate import Accelerator

    from ..vision.checkpoint import prepare_vision_output

    config = config or EarlyExitConfig()
    config.validate()
    # Not resumable here: the trained stage lives in `.<output>.partial`, whose stamp decides whether it is reused.
    output_dir = prepare_vision_output(output_dir, overwrite=overwrite, model=source, dataset=config.dataset)
    check_exit_source(source)  # reads no weights: a bad checkpoint is refused before the data loads
    train, val, test = load_splits(config)
    accelerator = accelerator or Accelerator()
    model, config = attach_exits(source, config, train, accelerator.device)
    partial = partial_dir(output_dir)
    model, history = train_jointly(
        model, train, config, partial, stage_settings(source, config), progress=progress, accelerator=accelerator
    )
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    search, report = search_and_report(model, config, val, test, progress=progress)
    result = measured_result(source, config, search, report, val=val, train=train, history=history)
    model.config.compression = result.provenance
    _save(model, output_dir, train, report, overwrite=overwrite)
    shutil.rmtree(partial, ignore_errors=True)
    return result


def search_and_report(
    model: ClassExitResNetForImageClassification,
    config: EarlyExitConfig,
    val: ImageClassificationData,
    test: ImageClassificationData | None,
    *,
    progress: bool = True,
) -> tuple[ThresholdSearch, dict[str, Any] | None]:
    """Searches the thresholds on `val` and sets them on `model`; then reports its real inference on `test`."""
    scores = collect_exit_scores(model, val, progress=progress)
    # Timed before the search, on the validation images (never the test split), on the device inference runs on.
    costs = measure_exit_costs(model, val) if config.cost == "latency" else None
    search = search_thresholds(scores, config.exit_rule, config.tolerance, config.step, costs=costs)
    model.config.exit_thresholds = list(search.thresholds)
    report = exit_report(model, test, progress=progress) if test is not None else None
    return search, report


def measured_result(
    source: str | Path,
    config: EarlyExitConfig,
    search: ThresholdSearch,
    report: dict[str, Any] | None,
    *,
    val: ImageClassificationData,
    train: ImageClassificationData,
    history: dict[str, Any],
) -> EarlyExitResult:
    """The figures of the test `report` (or of the validation `search` without one) and their provenance record."""
    train_ref = DataRef.of("train", config.dataset, "train")
    refs = [train_ref] + ([DataRef.of("evaluation", config.dataset, config.test_split)] if report else [])
    measured = {
        "thresholds": list(search.thresholds),
        "accuracy_full": report["accuracy_full"] if report else search.accuracy_full,
        "accuracy_early_exit": report["accuracy"] if report else search.accuracy,
        "macs_full": report["macs_full"] if report else search.macs_full,
        "mean_macs": report["mean_macs"] if report else search.mean_macs,
        "exit_histogram": report["exit_histogram"] if report else None,
        # the dataset by the name its DataRef records: a local path is never written into the checkpoint
        "dataset": f"{train_ref.name}:{config.test_split if report else 'validation'}",
    }
    figures = {
        **measured,
        "tolerance": config.tolerance,
        "exit_rule": config.exit_rule,
        "exit_positions": list(config.exit_positions),
        "validation": {"samples": len(val), "accuracy_full": search.accuracy_full,
                       "accuracy_early_exit": search.accuracy, "mean_macs": search.mean_macs,
                       "grid_settings": search.grid_settings, "search_moves": len(search.steps),
                       **({"mean_latency_ns": search.mean_cost, "latency_full_ns": search.cost_full}
                          if search.mean_cost is not None else {})},
        "training": {"epochs": config.epochs, "lr": config.lr, "batch_size": config.batch_size,
                     "train_backbone": config.train_backbone, "train_samples": len(train),
                     "final_loss": history["train_loss"][-1] if history["train_loss"] else None},
    }
    options = dataclasses.replace(config, dataset=train_ref.name)
    record = provenance(config.method, options, SourceRef.of(source), refs, figures)
    return EarlyExitResult(**measured, config=config, provenance=record)


def _save(
    model, output_dir: Path, train: ImageClassificationData, report: dict[str, Any] | None, *, overwrite: bool
) -> None:
    """Writes the checkpoint, its image processor (the training normalisation) and `exit_report.json` atomically."""
    from ..vision.checkpoint import save_checkpoint

    extra = {"exit_report.json": report} if report else {}
    save_checkpoint(model, output_dir, mean=train.mean, std=train.std, extra_json=extra, overwrite=overwrite)
