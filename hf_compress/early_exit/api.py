"""`hf-compress early-exit` end to end: attach exit heads, train jointly, search thresholds, save.

Stages: (1) load the source (a transformers ResNet or a ClassExitResNet) and attach heads; (2) train backbone
and heads jointly on the training split minus a held-out validation split; (3) search the thresholds on the
validation split; (4) report real batched early-exit inference on the test split; (5) write the checkpoint
atomically. After stage 2 the trained model is kept in `.<output>.partial/`, so a rerun with the same
settings resumes at the search instead of training again.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import __version__
from ..data.images import ImageClassificationData, load_image_dataset, train_val_split
from ..errors import HFCompressError
from ..modeling.class_exit_resnet import ClassExitResNetForImageClassification
from .heads import load_exit_model
from .search import (
    BASELINE_METHOD,
    METHOD,
    collect_exit_scores,
    exit_report,
    joint_loss_fn,
    search_thresholds,
)


@dataclass
class EarlyExitOptions:
    """Settings of one early-exit run (all recorded in the checkpoint's `compression` record)."""

    dataset: str = "cifar10"
    tolerance: float = 0.005
    exit_rule: str = "class_exclusion"
    exit_positions: list[str] | None = None
    exit_pool_size: int | None = None
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 128
    n_val: int = 5000
    train_limit: int | None = None
    test_split: str | None = "test"
    test_limit: int | None = None
    step: float = 0.01
    seed: int = 0


def load_splits(options: EarlyExitOptions) -> tuple[ImageClassificationData, ImageClassificationData, ImageClassificationData | None]:
    """Training and validation splits (the protocol's hold-out, seed 2023) and the test split when asked."""
    train = load_image_dataset(options.dataset, "train", limit=options.train_limit, seed=options.seed)
    train, val = train_val_split(train, n_val=options.n_val, seed=2023)
    test = None
    if options.test_split:
        test = load_image_dataset(options.dataset, options.test_split, limit=options.test_limit, seed=options.seed)
    return train, val, test


def _check_classes(model: ClassExitResNetForImageClassification, data: ImageClassificationData, source: str) -> None:
    if model.config.num_labels != data.num_classes:
        raise HFCompressError(
            f"{source} classifies {model.config.num_labels} classes (its heads have {model.config.num_labels} outputs) "
            f"but the dataset has {data.num_classes}; fine-tune it on this dataset first (hf-compress train)"
        )


def run_early_exit(
    model_path: str | Path,
    output_dir: str | Path,
    options: EarlyExitOptions | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    accelerator=None,
) -> dict:
    """Runs the whole early-exit conversion; returns the `compression` record written to the config ({} on the
    other processes of a multi-GPU run)."""
    from accelerate import Accelerator

    from ..vision.checkpoint import save_checkpoint
    from ..vision.training import train_classifier

    options = options or EarlyExitOptions()
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise HFCompressError(f"{output_dir} already exists (pass --overwrite to replace it)")
    if not 0 <= options.tolerance < 1:
        raise HFCompressError(f"tolerance must be in [0, 1) (0.005 = half an accuracy point), got {options.tolerance}")
    train, val, test = load_splits(options)
    # Under `accelerate launch` every process trains its shard; the search, report and save run once.
    accelerator = accelerator or Accelerator()
    main_process = accelerator.is_main_process
    model = load_exit_model(
        model_path, exit_positions=options.exit_positions, exit_pool_size=options.exit_pool_size, exit_rule=options.exit_rule
    )
    _check_classes(model, train, str(model_path))
    if model.config.id2label != train.id2label():
        model.config.id2label, model.config.label2id = train.id2label(), {n: i for i, n in train.id2label().items()}
    model.config.image_size = train.image_size[0]

    partial = output_dir.parent / f".{output_dir.name}.partial"
    settings = {"model": str(model_path), **asdict(options), "exit_positions": list(model.config.exit_positions),
                "exit_pool_size": model.config.exit_pool_size}
    settings.pop("tolerance"), settings.pop("step"), settings.pop("test_split"), settings.pop("test_limit")
    stamp = partial / "hf_compress_stage.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        model = ClassExitResNetForImageClassification.from_pretrained(partial)
        history = json.loads((partial / "train_history.json").read_text())
    else:
        trained = train_classifier(
            model, train, epochs=options.epochs, lr=options.lr, batch_size=options.batch_size, loss_fn=joint_loss_fn,
            seed=options.seed, progress=progress, desc="joint exit training", accelerator=accelerator,
        )
        history = asdict(trained)
        if main_process:
            shutil.rmtree(partial, ignore_errors=True)
            model.save_pretrained(partial)
            (partial / "train_history.json").write_text(json.dumps(history))
            stamp.write_text(json.dumps(settings))
    accelerator.wait_for_everyone()
    if not main_process:
        return {}

    scores = collect_exit_scores(model, val, progress=progress)
    search = search_thresholds(scores, model.config.exit_rule, options.tolerance, options.step)
    model.config.exit_thresholds = list(search.thresholds)
    report = exit_report(model, test, progress=progress) if test is not None else None
    record = {
        "method": METHOD if model.config.exit_rule == "class_exclusion" else BASELINE_METHOD,
        "source": {"model": str(model_path), "dataset": options.dataset},
        "exit_rule": model.config.exit_rule,
        "exit_positions": list(model.config.exit_positions),
        "betas" if model.config.exit_rule == "class_exclusion" else "confidence_thresholds": list(search.thresholds),
        "tolerance": options.tolerance,
        "dataset": f"{options.dataset}:{options.test_split}" if report else f"{options.dataset}:validation",
        "accuracy_full": report["accuracy_full"] if report else search.accuracy_full,
        "accuracy_early_exit": report["accuracy"] if report else search.accuracy,
        "macs_full": report["macs_full"] if report else search.macs_full,
        "mean_macs": report["mean_macs"] if report else search.mean_macs,
        "exit_histogram": report["exit_histogram"] if report else None,
        "validation": {"samples": len(val), "accuracy_full": search.accuracy_full, "accuracy_early_exit": search.accuracy,
                       "mean_macs": search.mean_macs},
        "training": {"epochs": options.epochs, "lr": options.lr, "batch_size": options.batch_size,
                     "train_samples": len(train), "final_loss": history["train_loss"][-1] if history["train_loss"] else None},
        "hf_compress_version": __version__,
    }
    model.config.compression = record
    extra = {"exit_report.json": report} if report else {}
    save_checkpoint(model, output_dir, mean=train.mean, std=train.std, extra_json=extra, overwrite=overwrite)
    shutil.rmtree(partial, ignore_errors=True)
    return record
