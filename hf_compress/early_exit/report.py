"""Reports of a ClassExitResNet's real batched early-exit inference: accuracy, MACs and exit shares (overall and
per class), as a dict or markdown, and wall-clock throughput."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.images import ImageClassificationData, load_image_dataset
from ..device import pick_device
from ..errors import HFCompressError
from ..modeling.class_exit_resnet import ClassExitResNetConfig, ClassExitResNetForImageClassification
from ..sources import check_checkpoint, load_pretrained
from .config import REPORT_BATCH_SIZE


@dataclass
class ExitOutcomes:
    """Per-sample outcomes of batched inference, on the CPU: early-exit and full-network predictions, exit taken
    (`len(exit_heads)` = the final classifier) and MACs spent."""

    predictions: torch.Tensor
    full_predictions: torch.Tensor
    exits: torch.Tensor
    macs: torch.Tensor


@torch.no_grad()
def run_exit_inference(
    model: ClassExitResNetForImageClassification, data: ImageClassificationData, batch_size: int = REPORT_BATCH_SIZE,
    progress: bool = False,
) -> ExitOutcomes:
    """Runs `data` through `model` in eval mode twice per batch: with early exit, and the full network."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions, exits, macs, full_predictions = [], [], [], []
    batches = tqdm(data.batches(batch_size), total=math.ceil(len(data) / batch_size), desc="exit report",
                   disable=not progress, leave=False)
    for images, _ in batches:
        images = images.to(device)
        out = model(pixel_values=images)
        predictions.append(out.logits.argmax(1).cpu())
        exits.append(out.exit_indices.cpu())
        macs.append(out.macs.cpu())
        full_predictions.append(model(pixel_values=images, early_exit=False).logits.argmax(1).cpu())
    model.train(was_training)
    return ExitOutcomes(torch.cat(predictions), torch.cat(full_predictions), torch.cat(exits), torch.cat(macs))


def _figures(outcomes: ExitOutcomes, labels: torch.Tensor, selection: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """Samples, accuracies, mean MACs and exit shares of the samples in `selection` (a boolean mask)."""
    counts = torch.bincount(outcomes.exits[selection], minlength=len(names)).float()
    shares = counts / max(1, int(selection.sum()))
    return {
        "samples": int(selection.sum()),
        "accuracy": float((outcomes.predictions == labels)[selection].float().mean()),
        "accuracy_full": float((outcomes.full_predictions == labels)[selection].float().mean()),
        "mean_macs": float(outcomes.macs[selection].float().mean()),
        "exit_histogram": {name: round(float(v), 6) for name, v in zip(names, shares)},
    }


def exit_report(
    model: ClassExitResNetForImageClassification, data: ImageClassificationData, batch_size: int = REPORT_BATCH_SIZE,
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy, mean MACs and exit shares (overall and per class) of real batched early-exit inference.

    Also reports the full network (final classifier, no exit) on the same data.
    """
    if len(data) == 0:
        raise HFCompressError("the evaluation dataset is empty")
    if data.num_classes != model.config.num_labels:
        raise HFCompressError(
            f"the model has {model.config.num_labels} classes but the dataset has {data.num_classes}"
        )
    outcomes = run_exit_inference(model, data, batch_size, progress)
    labels = data.labels.cpu()
    names = [*model.config.exit_positions, "final"]
    per_class = {
        name: _figures(outcomes, labels, labels == label, names)
        for label, name in enumerate(data.class_names)
        if (labels == label).any()
    }
    overall = _figures(outcomes, labels, torch.ones_like(labels, dtype=torch.bool), names)
    macs_full = model.full_macs(*data.image_size)
    return {
        "samples": len(labels),
        "exit_rule": model.config.exit_rule,
        "exit_positions": list(model.config.exit_positions),
        "thresholds": list(model.config.exit_thresholds),
        "accuracy": overall["accuracy"],
        "accuracy_full": overall["accuracy_full"],
        "macs_full": int(macs_full),
        "mean_macs": overall["mean_macs"],
        "macs_reduction": 1.0 - overall["mean_macs"] / macs_full,
        "exit_histogram": overall["exit_histogram"],
        "per_class": per_class,
    }


def report_checkpoint(
    model_id: str,
    dataset: str,
    split: str,
    *,
    limit: int | None = None,
    batch_size: int = REPORT_BATCH_SIZE,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`exit_report` of a saved ClassExitResNet (folder or Hub id) on a dataset split, normalised as it was trained.

    The options, the device and the data are checked before the model is loaded.
    """
    for name, flag, value in (("limit", "--limit", limit), ("batch_size", "--batch-size", batch_size)):
        if value is not None and value < 1:
            raise HFCompressError(f"{name} ({flag}) must be >= 1, got {value}")
    target = pick_device(device)
    _load_exit_checkpoint(model_id, config_only=True)
    data = load_image_dataset(dataset, split, limit=limit, **_normalisation(model_id))
    model = _load_exit_checkpoint(model_id).to(target)
    return exit_report(model, data, batch_size=batch_size, progress=progress)


def _load_exit_checkpoint(model_id: str, config_only: bool = False) -> ClassExitResNetForImageClassification | None:
    """The ClassExitResNet of `model_id`, or (`config_only`) just the checks that it holds a loadable one."""
    # The report never runs code shipped with a model (trust_flag None).
    model_type = check_checkpoint(model_id, trust_flag=None).get("model_type")
    if model_type != ClassExitResNetConfig.model_type:
        # Loaded anyway, another family's checkpoint fails later, after a warning, with a message of its own.
        raise HFCompressError(f"{model_id} holds a {model_type!r} model, not a ClassExitResNet: make one with "
                              "`hf-compress early-exit`")
    return None if config_only else load_pretrained(ClassExitResNetForImageClassification, model_id)


def _normalisation(model_id: str) -> dict[str, tuple[float, ...]]:
    """The mean and std of the checkpoint's image processor, so the report sees what the model was trained on."""
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(model_id)
        return {"mean": tuple(processor.image_mean), "std": tuple(processor.image_std)}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def report_markdown(report: dict) -> str:
    """The report of `exit_report` as markdown: a summary table and a per-class table."""
    names = [*report["exit_positions"], "final"]
    lines = [
        f"Exit rule `{report['exit_rule']}`, thresholds {report['thresholds']}, {report['samples']} samples.",
        "",
        "| | accuracy | mean MACs | MACs vs full |",
        "|---|---|---|---|",
        f"| full network | {100 * report['accuracy_full']:.2f}% | {report['macs_full'] / 1e6:.2f}M | 1.000 |",
        (
            f"| early exit | {100 * report['accuracy']:.2f}% | {report['mean_macs'] / 1e6:.2f}M | "
            f"{report['mean_macs'] / report['macs_full']:.3f} |"
        ),
        "",
        "| class | samples | accuracy | full accuracy | mean MACs | " + " | ".join(names) + " |",
        "|---|---|---|---|---|" + "---|" * len(names),
    ]
    rows = list(report["per_class"].items()) + [
        ("**all**", {"samples": report["samples"], "accuracy": report["accuracy"], "accuracy_full": report["accuracy_full"],
                     "mean_macs": report["mean_macs"], "exit_histogram": report["exit_histogram"]})
    ]
    for name, row in rows:
        shares = " | ".join(f"{100 * row['exit_histogram'][n]:.1f}%" for n in names)
        lines.append(
            f"| {name} | {row['samples']} | {100 * row['accuracy']:.2f}% | {100 * row['accuracy_full']:.2f}% | "
            f"{row['mean_macs'] / 1e6:.2f}M | {shares} |"
        )
    return "\n".join(lines) + "\n"


@torch.no_grad()
def measure_throughput(
    model: ClassExitResNetForImageClassification,
    data: ImageClassificationData,
    batch_size: int = 256,
    *,
    early_exit: bool = True,
    warmup: int = 1,
    max_batches: int | None = None,
) -> float:
    """Images per second of eval-mode inference over `data` in batches of `batch_size` (wall clock)."""
    device = next(model.parameters()).device
    model.eval()
    batches = [images.to(device) for images, _ in data.batches(batch_size)][:max_batches]
    if not batches:
        raise HFCompressError("no data to time")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for images in batches[:warmup]:
        model(pixel_values=images, early_exit=early_exit)
    sync()
    start = time.perf_counter()
    for images in batches:
        model(pixel_values=images, early_exit=early_exit)
    sync()
    return sum(len(images) for images in batches) / (time.perf_counter() - start)
