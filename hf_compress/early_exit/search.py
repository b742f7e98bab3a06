"""Early exit for ClassExitResNet: the exit scores of a dataset, the exit rule replayed on them, threshold search.

The threshold search never reruns the network: the validation set's exit and final logits are computed
once (every head evaluated), and the exit rule is replayed on them for each candidate set of thresholds
with the model's own rule functions, so what the search sees is what batched inference does. Candidate thresholds
lie between the samples' own statistics (`candidate_thresholds`); every exit's candidates are evaluated at once and
exactly (`line_outcomes`); a sub-grid of settings is enumerated exhaustively (`evaluate_grid`) before coordinate
moves that each lower the MACs (`search_thresholds`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

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
        return int((self.final_logits.argmax(1) == self.labels).sum()) / len(self.labels)

    def exit_cost(self, index: int, heads_spent: int) -> int:
        """MACs of a sample that stops at exit `index` after `heads_spent` MACs of evaluated heads (its own included)."""
        return sum(self.unit_macs[: self.exit_units[index] + 1]) + heads_spent


@dataclass
class ExitCosts:
    """What the threshold search minimises in place of MACs: the cost per image of each backbone unit, each exit head
    and the final classifier, as integers in `unit` (e.g. nanoseconds measured by `latency.measure_exit_costs`)."""

    units: list[int]
    heads: list[int]
    classifier: int
    unit: str = "ns"

    def applied_to(self, scores: ExitScores) -> ExitScores:
        """`scores` with this cost table in place of its MAC table (the rule's replay then adds up these costs)."""
        if len(self.units) != len(scores.unit_macs) or len(self.heads) != len(scores.head_macs):
            raise HFCompressError(f"the costs cover {len(self.units)} units and {len(self.heads)} heads; the scores "
                                  f"{len(scores.unit_macs)} units and {len(scores.head_macs)} heads")
        return dataclasses.replace(scores, unit_macs=list(self.units), head_macs=list(self.heads),
                                   classifier_macs=self.classifier)


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


def disabled_threshold(rule: str) -> float:
    """The threshold that turns an exit off: 1 for the confidence rule, 0 (no class excluded) for class exclusion."""
    return 1.0 if rule == "confidence" else 0.0


@dataclass
class _Replay:
    """The state of the exit rule on a set of rows (samples of `ExitScores`, possibly repeated) between exits."""

    rows: torch.Tensor
    candidates: torch.Tensor
    decided: torch.Tensor
    predictions: torch.Tensor
    exit_indices: torch.Tensor
    macs: torch.Tensor
    heads_spent: int = 0

    @classmethod
    def start(cls, rows: torch.Tensor, candidates: torch.Tensor, num_exits: int, heads_spent: int = 0) -> "_Replay":
        n = len(rows)
        return cls(rows=rows, candidates=candidates, decided=torch.zeros(n, dtype=torch.bool),
                   predictions=torch.zeros(n, dtype=torch.long), exit_indices=torch.full((n,), num_exits, dtype=torch.long),
                   macs=torch.zeros(n, dtype=torch.long), heads_spent=heads_spent)

    def advance(self, scores: ExitScores, thresholds: list[float], rule: str, start: int, stop: int) -> None:
        """Applies exits `start..stop-1` (the batched inference of the model, on cached logits)."""
        disabled = disabled_threshold(rule)
        for index in range(start, stop):
            threshold = thresholds[index]
            if threshold == disabled:
                continue
            self.heads_spent += scores.head_macs[index]
            logits = scores.exit_logits[index][self.rows]
            if rule == "confidence":
                stops = confidence_stops(logits, threshold) & ~self.decided
                choice = logits.argmax(1)
            else:
                survivors = exclude_classes(logits, self.candidates, threshold)
                self.candidates = torch.where(self.decided[:, None], self.candidates, survivors)
                stops = (self.candidates.sum(1) == 1) & ~self.decided
                choice = self.candidates.float().argmax(1)
            self.predictions[stops] = choice[stops]
            self.exit_indices[stops] = index
            self.macs[stops] = scores.exit_cost(index, self.heads_spent)
            self.decided |= stops

    def finish(self, scores: ExitScores) -> None:
        """The final classifier (restricted to the candidates) decides every row still undecided."""
        final = scores.final_logits[self.rows].masked_fill(~self.candidates, torch.finfo(torch.float32).min).argmax(1)
        self.predictions[~self.decided] = final[~self.decided]
        self.macs[~self.decided] = scores.full_macs + self.heads_spent


def simulate_exits(scores: ExitScores, thresholds: list[float], rule: str) -> ExitSimulation:
    """Replays the batched early-exit inference of the model on cached logits for `thresholds`."""
    n, num_labels = scores.final_logits.shape
    replay = _Replay.start(torch.arange(n), torch.ones(n, num_labels, dtype=torch.bool), len(scores.exit_logits))
    replay.advance(scores, thresholds, rule, 0, len(scores.exit_logits))
    replay.finish(scores)
    return ExitSimulation(
        predictions=replay.predictions, exit_indices=replay.exit_indices, macs=replay.macs,
        accuracy=int((replay.predictions == scores.labels).sum()) / n,
        # summed exactly as integers: float32 sums of tens of millions per sample lose whole MACs
        mean_macs=int(replay.macs.sum()) / n,
    )


def line_outcomes(
    scores: ExitScores, thresholds: list[float], rule: str, index: int, values: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Total MACs and correct predictions (int64 tensors, one per entry of `values`) of `simulate_exits` with exit
    `index`'s threshold set to each of `values` and the other exits at `thresholds`.

    Exact and much cheaper than one simulation per value: the exits before `index` do not depend on its threshold,
    and what follows depends only on which classes survive it. Under class exclusion a higher beta only drops
    candidates in increasing order of score, so a sample leaves exit `index` with one of at most K nested candidate
    sets (its top 1, 2, ... classes among its candidates); the later exits are replayed once for each, and each
    value then reads its samples' outcomes off that table. Under the confidence rule a sample either stops at the
    exit or goes on with the same state, which is replayed once.
    """
    num_exits = len(scores.exit_logits)
    n, num_labels = scores.final_logits.shape
    labels = scores.labels
    prefix = _Replay.start(torch.arange(n), torch.ones(n, num_labels, dtype=torch.bool), num_exits)
    prefix.advance(scores, thresholds, rule, 0, index)
    fixed_macs = int(prefix.macs[prefix.decided].sum())
    fixed_correct = int((prefix.predictions == labels)[prefix.decided].sum())
    open_ = ~prefix.decided
    rows, candidates = prefix.rows[open_], prefix.candidates[open_]
    head = scores.head_macs[index]
    heads_spent = prefix.heads_spent + head
    stop_cost = scores.exit_cost(index, heads_spent)
    logits = scores.exit_logits[index][rows]
    u = len(rows)
    values_t = torch.tensor(values, dtype=torch.float32)
    disabled = torch.tensor([v == disabled_threshold(rule) for v in values])

    def downstream(at_rows: torch.Tensor, start_candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MACs and correctness of the open samples `at_rows` (indices into `rows`) going on past the exit with
        `start_candidates`, its head paid."""
        replay = _Replay.start(rows[at_rows], start_candidates, num_exits, heads_spent)
        replay.advance(scores, thresholds, rule, index + 1, num_exits)
        replay.finish(scores)
        return replay.macs, replay.predictions == labels[replay.rows]

    if rule == "confidence":
        macs_on, correct_on = downstream(torch.arange(u), candidates)
        confidence, choice = logits.float().softmax(1).max(1).values, logits.argmax(1)
        stops = confidence[None, :] > values_t[:, None]
        macs = torch.where(stops, stop_cost, macs_on[None, :])
        correct = torch.where(stops, (choice == labels[rows])[None, :], correct_on[None, :])
    else:
        macs, correct = _exclusion_outcomes(logits, candidates, labels[rows], values_t, disabled, stop_cost, downstream)
    # a disabled exit evaluates no head: those going on did not pay it
    macs = macs - torch.where(disabled, head, 0)[:, None]
    return fixed_macs + macs.sum(1), fixed_correct + correct.long().sum(1)


def _exclusion_outcomes(
    logits: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor, values_t: torch.Tensor,
    disabled: torch.Tensor, stop_cost: int,
    downstream: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """`line_outcomes` under class exclusion: MACs and correctness `[values, u]` of the `u` open samples (their exit
    `logits`, `candidates` and `labels`), the later exits replayed by `downstream` once per nested candidate set
    that some value leads to."""
    u, num_labels = candidates.shape
    probs = torch.sigmoid(logits.float())
    ranked = probs.masked_fill(~candidates, -1.0)  # excluded classes (-1) never count below
    order = ranked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(num_labels).expand(u, num_labels).contiguous())
    # The survivors of each value, with exclude_classes' own float32 comparison s_k > beta * top (the top always
    # survives): the number of scores above the limit, read off the sorted scores.
    limits = (values_t[:, None] * ranked.max(1).values[None, :]).t().contiguous()  # [u, values]
    ascending = ranked.sort(dim=1).values
    counts = num_labels - torch.searchsorted(ascending, limits, right=True).t()  # [values, u]
    # variant m (0-based): the top m + 1 candidates survive; variant 0 stops at this exit
    picked = counts.clamp(min=1) - 1
    everyone = candidates.sum(1) - 1  # a disabled exit: every candidate goes on
    picked = torch.where(disabled[:, None], everyone[None, :], picked)
    # the later exits are replayed once per (variant, sample) that some value leads to
    needed = torch.zeros(num_labels, u, dtype=torch.bool)
    needed.scatter_(0, picked, True)
    needed[0] = False
    variant, sample = needed.nonzero(as_tuple=True)
    macs_table = torch.full((num_labels, u), stop_cost, dtype=torch.long)
    correct_table = (order[:, 0] == labels)[None, :].repeat(num_labels, 1)
    on_macs, on_correct = downstream(sample, candidates[sample] & (rank[sample] <= variant[:, None]))
    macs_table[variant, sample] = on_macs
    correct_table[variant, sample] = on_correct
    return macs_table.gather(0, picked), correct_table.gather(0, picked)


def _separating_values(stat: torch.Tensor, step: float, past_end: float) -> set[float]:
    """Thresholds that put the first step, 2 step, ... share of the sorted `stat` on one side: each halfway between
    the last value taken and the next different one (`past_end` beyond the last), as float32 values."""
    n = len(stat)
    values = set()
    for level in range(1, int(round(1 / step))):
        count = min(n, max(1, int(round(level * step * n))))
        last = stat[count - 1]
        beyond = stat[count:][stat[count:] != last]
        following = float(beyond[0]) if len(beyond) else past_end
        values.add(float(torch.tensor((float(last) + following) / 2, dtype=torch.float32)))
    return {value for value in values if 0.0 < value < 1.0}


def candidate_thresholds(scores: ExitScores, rule: str, step: float) -> list[list[float]]:
    """The thresholds the search may give each exit, spaced by samples rather than by value.

    Confidence: the thresholds at which a share step, 2 step, ... of the samples would stop at the exit if it were
    the only one (a sample stops below its top softmax probability). Class exclusion has two kinds of events, and
    gets the thresholds of both: a sample stops alone at beta >= (second sigmoid score) / (top score), and a class
    leaves at beta >= (its score) / (top score), spaced over all (sample, non-top class) pairs. Each threshold sits
    halfway between the two values it separates. Spacing by samples gives every exit and both rules the same
    resolution where their samples lie (confidence 0.995 against 0.999 matters, 0.3 against 0.4 may not). Values
    are float32-exact, as inference compares in float32.
    """
    candidates = []
    for logits in scores.exit_logits:
        logits = logits.float()
        if rule == "confidence":
            top = logits.softmax(1).max(1).values.sort(descending=True).values  # stops: top > t
            candidates.append(sorted(_separating_values(top, step, past_end=0.0), reverse=True))
            continue
        probs = torch.sigmoid(logits).sort(dim=1, descending=True).values
        ratios = probs[:, 1:] / probs[:, :1].clamp(min=torch.finfo(torch.float32).tiny)  # excluded: ratio <= beta
        values = _separating_values(ratios[:, 0].sort().values, step, past_end=1.0)
        values |= _separating_values(ratios.flatten().sort().values, step, past_end=1.0)
        candidates.append(sorted(values))
    return candidates


def search_options(scores: ExitScores, rule: str, step: float) -> list[list[float]]:
    """Every threshold the search may give each exit: disabled first, then `candidate_thresholds` in the order of
    growing aggressiveness (class-exclusion betas rising, confidence thresholds falling)."""
    return [[disabled_threshold(rule), *values] for values in candidate_thresholds(scores, rule, step)]


def coarse_options(options: list[list[float]], max_settings: int) -> list[list[float]]:
    """A sub-grid of `options` with at most `max_settings` settings (combinations), or `options` itself when it is
    that small. Each exit keeps its disabled value and values spread evenly over its list; exits grow one value at a
    time, in turn, while the product stays within the budget (so every exit gets about the same resolution)."""
    if math.prod(len(values) for values in options) <= max_settings:
        return [list(values) for values in options]
    counts = [1] * len(options)  # how many values each exit keeps (the disabled value included)
    grew = True
    while grew:
        grew = False
        for index in range(len(options)):
            trial = counts[index] + 1
            if trial <= len(options[index]) and math.prod(counts) // counts[index] * trial <= max_settings:
                counts[index] = trial
                grew = True
    coarse = []
    for values, count in zip(options, counts):
        active = values[1:]
        # `count - 1` values spread evenly over the candidate list, each at the middle of its share
        picks = sorted({int((j + 0.5) * len(active) / (count - 1)) for j in range(count - 1)}) if count > 1 else []
        coarse.append([values[0], *(active[i] for i in picks)])
    return coarse


@dataclass
class GridEvaluation:
    """The exact validation outcome of every setting of a threshold grid (one value per exit from `options`).

    `settings[s]` holds the index of each exit's value in `options`; `totals[s]` the MACs summed over the samples and
    `correct[s]` the number of correct predictions of `simulate_exits` with that setting.
    """

    options: list[list[float]]
    settings: torch.Tensor
    totals: torch.Tensor
    correct: torch.Tensor

    def thresholds(self, row: int) -> list[float]:
        return [values[int(i)] for values, i in zip(self.options, self.settings[row])]

    def cheapest(self, floor: int) -> int:
        """The row of the setting with the fewest MACs among those with at least `floor` correct predictions (ties:
        the most correct, then the first in grid order); -1 when none is."""
        feasible = torch.nonzero(self.correct >= floor).flatten()
        if len(feasible) == 0:
            return -1
        # lexicographic (fewest MACs, most correct, grid order): stable sorts from the last key to the first
        order = feasible[torch.sort(-self.correct[feasible], stable=True).indices]
        order = order[torch.sort(self.totals[order], stable=True).indices]
        return int(order[0])

    def frontier(self) -> list[int]:
        """Rows on the accuracy-vs-MACs Pareto front, cheapest first: every setting that is more accurate than every
        cheaper-or-equal one."""
        order = torch.sort(-self.correct, stable=True).indices
        order = order[torch.sort(self.totals[order], stable=True).indices]
        rows, best = [], -1
        for row in order.tolist():
            if int(self.correct[row]) > best:
                rows.append(row)
                best = int(self.correct[row])
        return rows


def evaluate_grid(scores: ExitScores, rule: str, options: list[list[float]]) -> GridEvaluation:
    """`GridEvaluation` of every combination of `options` (one list of values per exit), exactly: one
    `line_outcomes` call per combination of the other exits, along the exit with the most values."""
    num_exits = len(options)
    n = len(scores.labels)
    if num_exits == 0:  # one setting: the network itself
        correct = int((scores.final_logits.argmax(1) == scores.labels).sum())
        return GridEvaluation([], torch.zeros(1, 0, dtype=torch.long), torch.tensor([scores.full_macs * n]),
                              torch.tensor([correct]))
    along = max(range(num_exits), key=lambda index: len(options[index]))
    others = [index for index in range(num_exits) if index != along]
    settings, totals, correct = [], [], []
    width = len(options[along])
    for combination in itertools.product(*(range(len(options[index])) for index in others)):
        thresholds = [0.0] * num_exits
        row = torch.zeros(width, num_exits, dtype=torch.long)
        for index, choice in zip(others, combination):
            thresholds[index] = options[index][choice]
            row[:, index] = choice
        row[:, along] = torch.arange(width)
        line_totals, line_correct = line_outcomes(scores, thresholds, rule, along, options[along])
        settings.append(row)
        totals.append(line_totals)
        correct.append(line_correct)
    return GridEvaluation([list(values) for values in options], torch.cat(settings), torch.cat(totals),
                          torch.cat(correct))


# Settings evaluated exhaustively by default before the coordinate search (under a minute of CPU on 5,000
# validation images, 10 classes and 5 exits).
DEFAULT_GRID_SETTINGS = 1024


@dataclass
class ThresholdSearch:
    """Result of `search_thresholds`: the chosen thresholds and their validation figures.

    `grid_thresholds` is the cheapest feasible setting of the exhaustive sub-grid (`grid_settings` settings
    evaluated) and `steps` the coordinate moves accepted after it, in order (exit, thresholds after the move,
    accuracy, mean MACs): every one lowers the mean MACs. `grid` is the full grid evaluation (not serialised).
    With `costs`, the search minimised them instead: `mean_cost` and `cost_full` are in their unit, `steps` and
    `grid` too, while `mean_macs` and `macs_full` stay MACs.
    """

    thresholds: list[float]
    accuracy_full: float
    accuracy: float
    mean_macs: float
    macs_full: int
    tolerance: float
    steps: list[dict] = field(default_factory=list)
    grid_thresholds: list[float] = field(default_factory=list)
    grid_settings: int = 0
    grid: GridEvaluation | None = field(default=None, repr=False, compare=False)
    mean_cost: float | None = None
    cost_full: int | None = None


def correct_floor(scores: ExitScores, tolerance: float) -> int:
    """The fewest correct validation predictions within `tolerance` of the full network (counted exactly)."""
    n = len(scores.labels)
    return int((scores.final_logits.argmax(1) == scores.labels).sum()) - math.floor(tolerance * n + 1e-9)


def search_thresholds(
    scores: ExitScores,
    rule: str,
    tolerance: float,
    step: float = 0.01,
    start: list[float] | None = None,
    *,
    max_grid: int = DEFAULT_GRID_SETTINGS,
    grid: GridEvaluation | None = None,
    costs: ExitCosts | None = None,
) -> ThresholdSearch:
    """The thresholds with the fewest mean MACs whose validation accuracy stays within `tolerance` of the full
    network's (counted in samples: at most floor(tolerance * n) fewer correct predictions).

    Every exit may take the values of `search_options` (disabled, or a threshold between two consecutive samples'
    statistics, `step` of the samples apart). Two stages:

    1. Exhaustive: every setting of a sub-grid of at most `max_grid` settings (`coarse_options`: each exit's
       disabled value and evenly spread candidates) is evaluated exactly, and the cheapest feasible one is taken.
       When the whole grid has at most `max_grid` settings, this is the exact optimum, and the search ends there.
    2. Coordinate descent on the full grid from that setting (and from `start`, e.g. the result at a smaller
       tolerance, when it is feasible): each round, every exit is tried at every value; a move is admissible only
       if it keeps the accuracy within the tolerance and strictly lowers the mean MACs, and among admissible moves
       the one saving the most MACs per validation sample lost is taken (a lossless move counts as losing one
       sample). The descent ends when no move is admissible, so it always terminates and never returns a setting
       dearer than the grid's.

    `grid` reuses an evaluation of the same scores, rule and costs (from another tolerance's search). `costs`
    (e.g. measured latency, `latency.measure_exit_costs`) replace the MACs as what is minimised; the result still
    reports the MACs of the thresholds found.
    """
    if not 0 <= tolerance < 1:
        raise HFCompressError(f"tolerance must be in [0, 1) (a fraction of accuracy, 0.005 = half a point), got {tolerance}")
    if not 0 < step < 1:
        raise HFCompressError(f"the search step must be in (0, 1), got {step}")
    if max_grid < 1:
        raise HFCompressError(f"max_grid must be >= 1, got {max_grid}")
    macs_scores = scores
    if costs is not None:
        scores = costs.applied_to(scores)
    floor = correct_floor(scores, tolerance)
    options = search_options(scores, rule, step)
    if start is not None and len(start) != len(options):
        raise HFCompressError(f"start has {len(start)} thresholds for {len(options)} exits")
    if grid is None:
        grid = evaluate_grid(scores, rule, coarse_options(options, max_grid))
    row = grid.cheapest(floor)  # the all-disabled setting is on every grid and always feasible
    seeds = [grid.thresholds(row)]
    if start is not None:
        trial = simulate_exits(scores, list(start), rule)
        if int((trial.predictions == scores.labels).sum()) >= floor:
            seeds.append(list(start))
    best = None
    for seed in seeds:
        outcome = _descend(scores, rule, options, seed, floor)
        if best is None or (outcome[1], -outcome[2]) < (best[1], -best[2]):
            best = outcome
    thresholds, total, correct, steps = best
    final = simulate_exits(scores, thresholds, rule)
    if int(final.macs.sum()) != total or int((final.predictions == scores.labels).sum()) != correct:
        raise AssertionError("threshold search: the line evaluation disagrees with the replay")  # a bug, not bad input
    in_macs = simulate_exits(macs_scores, thresholds, rule) if costs is not None else final
    return ThresholdSearch(
        thresholds=list(thresholds), accuracy_full=scores.full_accuracy, accuracy=final.accuracy,
        mean_macs=in_macs.mean_macs, macs_full=macs_scores.full_macs, tolerance=tolerance, steps=steps,
        grid_thresholds=grid.thresholds(row), grid_settings=len(grid.totals), grid=grid,
        mean_cost=final.mean_macs if costs is not None else None,
        cost_full=scores.full_macs if costs is not None else None,
    )


def _descend(
    scores: ExitScores, rule: str, options: list[list[float]], thresholds: list[float], floor: int
) -> tuple[list[float], int, int, list[dict]]:
    """Coordinate descent from the feasible `thresholds` (see `search_thresholds`); returns the thresholds reached,
    their total MACs and correct predictions, and the moves taken."""
    n = len(scores.labels)
    thresholds = list(thresholds)
    current = simulate_exits(scores, thresholds, rule)
    total, correct = int(current.macs.sum()), int((current.predictions == scores.labels).sum())
    steps = []
    while True:
        best = None
        for index, values in enumerate(options):
            totals, rights = line_outcomes(scores, thresholds, rule, index, values)
            for value, new_total, new_correct in zip(values, totals.tolist(), rights.tolist()):
                if value == thresholds[index] or new_correct < floor or new_total >= total:
                    continue
                merit = (total - new_total) / (max(correct - new_correct, 0) + 1)
                if best is None or merit > best[0]:
                    best = (merit, index, value, new_total, new_correct)
        if best is None:
            return thresholds, total, correct, steps
        _, index, value, total, correct = best
        thresholds[index] = value
        steps.append({"exit": index, "thresholds": list(thresholds), "accuracy": correct / n, "mean_macs": total / n})
