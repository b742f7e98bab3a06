"""Early exit for ClassExitResNet: the exit scores of a dataset, the exit rule replayed on them, threshold search.

The threshold search never reruns the network: the validation set's exit and final logits are computed
once (every head evaluated), and the exit rule is replayed on them for each candidate set of thresholds
with the model's own rule functions, so what the search sees is what batched inference does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
    limit = int(round(1 / step)) - 1  # the largest aggressiveness index still below 1

    def values(levels: list[int]) -> list[float]:
        return [round(1 - level * step, 6) if rule == "confidence" else round(level * step, 6) for level in levels]

    accuracy_full = scores.full_accuracy
    floor = accuracy_full - tolerance - 1e-9
    levels = [0] * len(scores.exit_logits)
    current = simulate_exits(scores, values(levels), rule)
    best = (current.mean_macs, list(levels), current)
    steps = []
    while True:
        move = _best_move(scores, rule, levels, current, floor, limit, values)
        if move is None:
            break
        index, levels, current = move
        steps.append({"exit": index, "thresholds": values(levels), "accuracy": current.accuracy, "mean_macs": current.mean_macs})
        if current.mean_macs < best[0]:
            best = (current.mean_macs, list(levels), current)
    _, levels, result = best
    return ThresholdSearch(
        thresholds=values(levels), accuracy_full=accuracy_full, accuracy=result.accuracy, mean_macs=result.mean_macs,
        macs_full=scores.full_macs, tolerance=tolerance, steps=steps,
    )


def _best_move(
    scores: ExitScores,
    rule: str,
    levels: list[int],
    current: ExitSimulation,
    floor: float,
    limit: int,
    values: Callable[[list[int]], list[float]],
) -> tuple[int, list[int], ExitSimulation] | None:
    """One round of the search: the exit whose next step saves the most MACs per validation sample lost while
    accuracy stays >= `floor`, as `(exit, new levels, simulation)`; `None` when no exit can move."""
    one_sample = 1.0 / len(scores.labels)  # so that a lossless move is ranked by the MACs it saves
    moves = []
    for index in range(len(levels)):
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
        return None
    _, index, trial, result = max(moves, key=lambda move: move[0])
    return index, trial, result
