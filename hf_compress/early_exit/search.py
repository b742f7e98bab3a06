"""Early exit for ClassExitResNet: joint training loss, threshold search, reports.

The threshold search never reruns the network: the validation set's exit and final logits are computed
once (every head evaluated), and the exit rule is replayed on them for each candidate set of thresholds
with the model's own rule functions, so what the search sees is what batched inference does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..data.images import ImageClassificationData
from ..errors import HFCompressError
from ..modeling.class_exit_resnet import (
    ClassExitResNetForImageClassification,
    confidence_stops,
    exclude_classes,
)

METHOD = "class_exclusion_early_exit"
BASELINE_METHOD = "confidence_early_exit"


def joint_loss_fn(model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`loss_fn` for `train_classifier`: CE on the final output + weighted exit losses (see `joint_exit_loss`)."""
    return model(pixel_values=images, labels=labels, early_exit=False).loss


@dataclass
class ExitScores:
    """Every exit's logits and the final logits of a dataset (full mode), with the labels and the MAC table."""

    exit_logits: list[torch.Tensor]
    final_logits: torch.Tensor
    labels: torch.Tensor
    unit_macs: list[int]
    head_macs: list[int]
    classifier_macs: int
    exit_units: list[int]

    @property
    def full_macs(self) -> int:
        return sum(self.unit_macs) + self.classifier_macs

    @property
    def full_accuracy(self) -> float:
        return float((self.final_logits.argmax(1) == self.labels).float().mean())


@torch.no_grad()
def collect_exit_scores(
    model: ClassExitResNetForImageClassification, data: ImageClassificationData, batch_size: int = 512, progress: bool = False
) -> ExitScores:
    """Runs `data` through `model` in eval mode with every exit head evaluated; results on the CPU."""
    if len(data) == 0:
        raise HFCompressError("the dataset for the threshold search is empty")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    exits: list[list[torch.Tensor]] = [[] for _ in model.exit_heads]
    finals = []
    batches = tqdm(data.batches(batch_size), total=math.ceil(len(data) / batch_size), desc="exit scores",
                   disable=not progress, leave=False)
    for images, _ in batches:
        out = model(pixel_values=images.to(device), early_exit=False)
        finals.append(out.logits.float().cpu())
        for store, logits in zip(exits, out.exit_logits):
            store.append(logits.float().cpu())
    model.train(was_training)
    units, heads, classifier = model.unit_macs(*data.image_size)
    return ExitScores(
        exit_logits=[torch.cat(store) for store in exits], final_logits=torch.cat(finals), labels=data.labels.cpu(),
        unit_macs=units, head_macs=heads, classifier_macs=classifier, exit_units=list(model.exit_units),
    )


@dataclass
class ExitSimulation:
    """Per-sample decisions of the exit rule on cached scores."""

    predictions: torch.Tensor
    exit_indices: torch.Tensor
    macs: torch.Tensor
    accuracy: float
    mean_macs: float


def simulate_exits(scores: ExitScores, thresholds: list[float], rule: str) -> ExitSimulation:
    """Replays the batched early-exit inference of the model on cached logits for `thresholds`."""
    disabled = 1.0 if rule == "confidence" else 0.0
    n, num_labels = scores.final_logits.shape
    num_exits = len(scores.exit_logits)
    candidates = torch.ones(n, num_labels, dtype=torch.bool)
    decided = torch.zeros(n, dtype=torch.bool)
    predictions = torch.zeros(n, dtype=torch.long)
    exit_indices = torch.full((n,), num_exits, dtype=torch.long)
    macs = torch.zeros(n, dtype=torch.long)
    heads_spent = 0
    for index, (logits, threshold) in enumerate(zip(scores.exit_logits, thresholds)):
        if threshold == disabled:
            continue
        heads_spent += scores.head_macs[index]
        if rule == "confidence":
            stops = confidence_stops(logits, threshold) & ~decided
            choice = logits.argmax(1)
        else:
            survivors = exclude_classes(logits, candidates, threshold)
            candidates = torch.where(decided[:, None], candidates, survivors)
            stops = (candidates.sum(1) == 1) & ~decided
            choice = candidates.float().argmax(1)
        predictions[stops] = choice[stops]
        exit_indices[stops] = index
        macs[stops] = sum(scores.unit_macs[: scores.exit_units[index] + 1]) + heads_spent
        decided |= stops
    final = scores.final_logits.masked_fill(~candidates, torch.finfo(torch.float32).min).argmax(1)
    predictions[~decided] = final[~decided]
    macs[~decided] = scores.full_macs + heads_spent
    return ExitSimulation(
        predictions=predictions, exit_indices=exit_indices, macs=macs,
        accuracy=float((predictions == scores.labels).float().mean()), mean_macs=float(macs.float().mean()),
    )


@dataclass
class ThresholdSearch:
    """Result of `search_thresholds`: the chosen thresholds and their validation figures."""

    thresholds: list[float]
    accuracy_full: float
    accuracy: float
    mean_macs: float
    macs_full: int
    tolerance: float
    steps: list[dict] = field(default_factory=list)


def search_thresholds(scores: ExitScores, rule: str, tolerance: float, step: float = 0.01) -> ThresholdSearch:
    """Greedy search: raise one exit's threshold by `step` at a time while accuracy stays within `tolerance`.

    Each threshold has an aggressiveness a in {0, step, 2 step, ...} below 1: beta = a for class exclusion,
    confidence threshold = 1 - a for the baseline; a = 0 is a disabled exit. At every round each exit is
    tried one step further, on the whole validation set; among the moves that keep accuracy
    >= full accuracy - tolerance, the one that saves the most MACs per validation sample lost is taken.
    The search stops when no exit can move, and returns the visited setting with the fewest mean MACs.
    """
    if not 0 <= tolerance < 1:
        raise HFCompressError(f"tolerance must be in [0, 1) (a fraction of accuracy, 0.005 = half a point), got {tolerance}")
    if not 0 < step < 1:
        raise HFCompressError(f"the search step must be in (0, 1), got {step}")
    num_exits = len(scores.exit_logits)
    limit = int(round(1 / step)) - 1  # the largest aggressiveness index still below 1

    def values(levels: list[int]) -> list[float]:
        return [round(1 - level * step, 6) if rule == "confidence" else round(level * step, 6) for level in levels]

    accuracy_full = scores.full_accuracy
    floor = accuracy_full - tolerance - 1e-9
    levels = [0] * num_exits
    current = simulate_exits(scores, values(levels), rule)
    best = (current.mean_macs, list(levels), current)
    one_sample = 1.0 / len(scores.labels)
    steps = []
    while True:
        moves = []
        for index in range(num_exits):
            if levels[index] >= limit:
                continue
            trial = list(levels)
            trial[index] += 1
            result = simulate_exits(scores, values(trial), rule)
            if result.accuracy >= floor:
                saved = current.mean_macs - result.mean_macs
                lost = max(current.accuracy - result.accuracy, 0.0)
                moves.append((saved / (lost + one_sample), index, trial, result))
        if not moves:
            break
        _, index, levels, current = max(moves, key=lambda move: move[0])
        steps.append({"exit": index, "thresholds": values(levels), "accuracy": current.accuracy, "mean_macs": current.mean_macs})
        if current.mean_macs < best[0]:
            best = (current.mean_macs, list(levels), current)
    _, levels, result = best
    return ThresholdSearch(
        thresholds=values(levels), accuracy_full=accuracy_full, accuracy=result.accuracy, mean_macs=result.mean_macs,
        macs_full=scores.full_macs, tolerance=tolerance, steps=steps,
    )


@torch.no_grad()
def exit_report(
    model: ClassExitResNetForImageClassification, data: ImageClassificationData, batch_size: int = 256, progress: bool = False
) -> dict:
    """Accuracy, mean MACs and exit shares (overall and per class) of real batched early-exit inference.

    Also reports the full network (final classifier, no exit) on the same data.
    """
    if len(data) == 0:
        raise HFCompressError("the evaluation dataset is empty")
    if data.num_classes != model.config.num_labels:
        raise HFCompressError(
            f"the model has {model.config.num_labels} classes but the dataset has {data.num_classes}"
        )
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
    predictions, exits, macs = torch.cat(predictions), torch.cat(exits), torch.cat(macs)
    full_predictions, labels = torch.cat(full_predictions), data.labels.cpu()
    num_exits = len(model.exit_heads)
    names = [*model.config.exit_positions, "final"]
    correct = predictions == labels

    def histogram(selection: torch.Tensor) -> dict[str, float]:
        counts = torch.bincount(exits[selection], minlength=num_exits + 1).float()
        return {name: round(float(v), 6) for name, v in zip(names, counts / max(1, int(selection.sum())))}

    everything = torch.ones_like(correct)
    macs_full = model.full_macs(*data.image_size)
    per_class = {}
    for label, name in enumerate(data.class_names):
        selection = labels == label
        if selection.any():
            per_class[name] = {
                "samples": int(selection.sum()),
                "accuracy": float(correct[selection].float().mean()),
                "accuracy_full": float((full_predictions == labels)[selection].float().mean()),
                "mean_macs": float(macs[selection].float().mean()),
                "exit_histogram": histogram(selection),
            }
    mean_macs = float(macs.float().mean())
    return {
        "samples": len(labels),
        "exit_rule": model.config.exit_rule,
        "exit_positions": list(model.config.exit_positions),
        "thresholds": list(model.config.exit_thresholds),
        "accuracy": float(correct.float().mean()),
        "accuracy_full": float((full_predictions == labels).float().mean()),
        "macs_full": int(macs_full),
        "mean_macs": mean_macs,
        "macs_reduction": 1.0 - mean_macs / macs_full,
        "exit_histogram": histogram(everything),
        "per_class": per_class,
    }


def report_markdown(report: dict) -> str:
    """The report of `exit_report` as markdown: a summary table and a per-class table."""
    names = [*report["exit_positions"], "final"]
    lines = [
        f"Exit rule `{report['exit_rule']}`, thresholds {report['thresholds']}, {report['samples']} samples.",
        "",
        "| | accuracy | mean MACs | MACs vs full |",
        "|---|---|---|---|",
        f"| full network | {100 * report['accuracy_full']:.2f}% | {report['macs_full'] / 1e6:.2f}M | 1.000 |",
        f"| early exit | {100 * report['accuracy']:.2f}% | {report['mean_macs'] / 1e6:.2f}M | "
        f"{report['mean_macs'] / report['macs_full']:.3f} |",
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
