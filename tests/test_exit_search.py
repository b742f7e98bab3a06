"""The threshold search of early exit: exact line evaluation, the cheapest feasible setting against a brute-force
search, only MAC-saving feasible moves, MACs of the decisions against torch's FLOP counter; the exit losses against
an independent computation; exit-head training on a frozen backbone."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hf_compress.data.images import ImageClassificationData
from hf_compress.early_exit.config import EarlyExitConfig
from hf_compress.early_exit.latency import measure_exit_costs
from hf_compress.early_exit.search import (
    ExitCosts,
    ExitScores,
    candidate_thresholds,
    coarse_options,
    collect_exit_scores,
    evaluate_grid,
    line_outcomes,
    search_options,
    search_thresholds,
    simulate_exits,
)
from hf_compress.early_exit.training import exit_head_loss, frozen_exit_logits, heads_loss_fn, train_exits
from hf_compress.modeling.class_exit_resnet import ClassExitResNetConfig, ClassExitResNetForImageClassification

torch.set_num_threads(1)
RULES = ["class_exclusion", "confidence"]
DISABLED = {"class_exclusion": 0.0, "confidence": 1.0}
# MAC table of the synthetic cases: stem, 6 blocks; exits after units 1, 3 and 5.
UNITS, HEADS, CLASSIFIER, EXIT_UNITS = [50, 100, 100, 100, 100, 100, 100], [7, 11, 13], 3, [1, 3, 5]


def _scores(exit_logits: list[torch.Tensor], final: torch.Tensor, labels: torch.Tensor) -> ExitScores:
    return ExitScores(exit_logits=exit_logits, final_logits=final, labels=labels, unit_macs=UNITS, head_macs=HEADS,
                      classifier_macs=CLASSIFIER, exit_units=EXIT_UNITS)


def _random_scores(seed: int, n: int = 240, k: int = 5, signal: float = 2.0) -> ExitScores:
    """Exits whose logits favour the label more and more with depth; a final classifier right most of the time."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    onehot = F.one_hot(labels, k).float()
    exits = [torch.randn(n, k, generator=g) * 2 + signal * (i + 1) * onehot for i in range(3)]
    return _scores(exits, torch.randn(n, k, generator=g) + 3 * onehot, labels)


def _cost(exit_index: int, heads: list[int]) -> int:
    """Independent MACs of a sample stopping at `exit_index` with the heads `heads` evaluated."""
    return sum(UNITS[: EXIT_UNITS[exit_index] + 1]) + sum(HEADS[i] for i in heads)


@pytest.mark.parametrize("rule", RULES)
def test_line_outcomes_equal_one_replay_per_value(rule):
    """The search's one-pass evaluation of every threshold of an exit equals a full replay for each value."""
    scores = _random_scores(1)
    candidates = candidate_thresholds(scores, rule, 0.05)
    rng = random.Random(0)
    for _ in range(4):
        thresholds = [rng.choice([DISABLED[rule], *values]) for values in candidates]
        for index in range(3):
            values = [DISABLED[rule], *candidates[index]]
            totals, rights = line_outcomes(scores, thresholds, rule, index, values)
            for value, total, right in zip(values, totals.tolist(), rights.tolist()):
                trial = list(thresholds)
                trial[index] = value
                sim = simulate_exits(scores, trial, rule)
                assert total == int(sim.macs.sum())
                assert right == int((sim.predictions == scores.labels).sum())


@pytest.mark.parametrize("rule", RULES)
def test_candidates_are_spaced_by_samples(rule):
    """Alone at its exit, the candidate thresholds stop the shares of samples they were built for (no ties here)."""
    scores = _random_scores(2, n=200)
    step = 0.1
    for index, values in enumerate(candidate_thresholds(scores, rule, step)):
        stopped = []
        for value in values:
            thresholds = [DISABLED[rule]] * 3
            thresholds[index] = value
            stopped.append(int((simulate_exits(scores, thresholds, rule).exit_indices == index).sum()))
        if rule == "confidence":
            assert stopped == [20 * level for level in range(1, 10)]
        else:  # and the betas at which a share of the (sample, class) pairs is excluded
            assert {20 * level for level in range(1, 10)} <= set(stopped) and len(values) > 9
        assert all(0 < value < 1 for value in values)


def _brute_force(scores: ExitScores, rule: str, tolerance: float, options: list[list[float]]) -> tuple[int, int]:
    """(fewest total MACs, most correct among those) over every setting of `options` within the tolerance, by one
    plain replay per setting."""
    n = len(scores.labels)
    floor = int((scores.final_logits.argmax(1) == scores.labels).sum()) - int(tolerance * n + 1e-9)
    best = None
    for setting in itertools.product(*options):
        sim = simulate_exits(scores, list(setting), rule)
        total, correct = int(sim.macs.sum()), int((sim.predictions == scores.labels).sum())
        if correct >= floor and (best is None or (total, -correct) < best):
            best = (total, -correct)
    return best[0], -best[1]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("tolerance", [0.0, 0.02, 0.05])
@pytest.mark.parametrize("seed", [5, 6, 7])
def test_search_returns_the_cheapest_feasible_setting_of_a_small_grid(rule, tolerance, seed):
    """On a grid small enough to enumerate, the search returns the setting a brute-force search over every
    combination finds: the fewest validation MACs within the tolerance (the most correct among equally cheap)."""
    scores = _random_scores(seed, n=120, signal=1.5)
    options = search_options(scores, rule, 0.25)  # disabled + 3 to 6 thresholds per exit
    assert all(len(values) >= 4 for values in options) and 64 <= len(list(itertools.product(*options))) <= 400
    total, correct = _brute_force(scores, rule, tolerance, options)
    search = search_thresholds(scores, rule, tolerance, step=0.25)
    assert round(search.mean_macs * 120) == total and round(search.accuracy * 120) == correct
    if tolerance > 0:
        assert search.mean_macs < scores.full_macs  # the case has something to save
    assert search.grid_settings == len(list(itertools.product(*options)))  # the whole grid was enumerated
    # a grid with fewer settings than the whole (and the coordinate descent after it) is never cheaper than that
    small = search_thresholds(scores, rule, tolerance, step=0.25, max_grid=8)
    assert small.grid_settings <= 8 and round(small.mean_macs * 120) >= total
    assert small.accuracy >= small.accuracy_full - tolerance - 1e-9


@pytest.mark.parametrize("rule", RULES)
def test_grid_evaluation_is_exact(rule):
    """Every setting of the grid evaluation, against one replay per setting; the sub-grid keeps every exit's
    disabled value and stays within its budget."""
    scores = _random_scores(8, n=90)
    options = search_options(scores, rule, 0.2)
    coarse = coarse_options(options, 40)
    assert all(c[0] == o[0] and set(c) <= set(o) for c, o in zip(coarse, options))
    grid = evaluate_grid(scores, rule, coarse)
    assert len(grid.totals) == len(list(itertools.product(*coarse))) <= 40
    seen = set()
    for row in range(len(grid.totals)):
        thresholds = grid.thresholds(row)
        seen.add(tuple(thresholds))
        sim = simulate_exits(scores, thresholds, rule)
        assert int(grid.totals[row]) == int(sim.macs.sum())
        assert int(grid.correct[row]) == int((sim.predictions == scores.labels).sum())
    assert len(seen) == len(grid.totals)
    front = grid.frontier()
    assert [int(grid.totals[r]) for r in front] == sorted(int(grid.totals[r]) for r in front)
    assert [int(grid.correct[r]) for r in front] == sorted({int(grid.correct[r]) for r in front})
    for row in range(len(grid.totals)):  # nothing off the front is both as cheap and as accurate as a point on it
        on = [r for r in front if int(grid.totals[r]) <= int(grid.totals[row])]
        assert max(int(grid.correct[r]) for r in on) >= int(grid.correct[row])


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("tolerance", [0.0, 0.01, 0.05])
@pytest.mark.parametrize("max_grid", [1, 64])
def test_every_accepted_move_saves_macs_and_stays_feasible(rule, tolerance, max_grid):
    """From the grid's setting (the full network alone with `max_grid` 1), every coordinate move taken lowers the
    mean MACs and stays within the tolerance, and the result is a local optimum: no single threshold change from it
    is both feasible and cheaper."""
    scores = _random_scores(3)
    n = len(scores.labels)
    search = search_thresholds(scores, rule, tolerance, step=0.05, max_grid=max_grid)
    full_correct = int((scores.final_logits.argmax(1) == scores.labels).sum())
    start = simulate_exits(scores, search.grid_thresholds, rule)
    if max_grid == 1:
        assert search.grid_thresholds == [DISABLED[rule]] * 3 and start.mean_macs == scores.full_macs
        assert search.steps, "this case has savings to find"
    previous = start.mean_macs
    for step in search.steps:
        assert step["mean_macs"] < previous  # strictly: a move that saves nothing is never taken
        assert step["accuracy"] * n >= full_correct - tolerance * n - 1e-6
        previous = step["mean_macs"]
        # the recorded figures are what a replay of the recorded thresholds gives
        sim = simulate_exits(scores, step["thresholds"], rule)
        assert sim.mean_macs == pytest.approx(step["mean_macs"]) and sim.accuracy == pytest.approx(step["accuracy"])
    final = simulate_exits(scores, search.thresholds, rule)
    assert search.mean_macs == final.mean_macs == previous < scores.full_macs
    assert final.accuracy >= search.accuracy_full - tolerance - 1e-9
    for index, values in enumerate(search_options(scores, rule, 0.05)):
        totals, rights = line_outcomes(scores, search.thresholds, rule, index, values)
        cheaper = totals < int(final.macs.sum())
        assert not bool((cheaper & (rights >= full_correct - int(tolerance * n + 1e-9))).any())


@pytest.mark.parametrize("rule", RULES)
def test_start_is_continued_and_larger_tolerances_are_no_dearer(rule):
    """A search started from the result at a smaller tolerance returns a setting no dearer than it."""
    scores = _random_scores(9)
    previous = None
    for tolerance in (0.0, 0.01, 0.03, 0.08):
        search = search_thresholds(scores, rule, tolerance, step=0.05, max_grid=16,
                                   start=previous.thresholds if previous else None)
        if previous is not None:
            assert search.mean_macs <= previous.mean_macs
        previous = search
    with pytest.raises(Exception, match="start has 2 thresholds for 3 exits"):
        search_thresholds(scores, rule, 0.01, step=0.05, start=[DISABLED[rule]] * 2)


@pytest.mark.parametrize("rule", RULES)
def test_no_move_is_taken_when_exiting_saves_nothing(rule):
    """Heads that never settle on one class (two classes tied on top): any enabled exit only adds its head's MACs,
    so the search keeps the full network and takes no step, even with a generous tolerance."""
    n, k = 60, 4
    labels = torch.arange(n) % k
    tied = torch.full((n, k), -6.0)
    tied[:, 0] = tied[:, 1] = 6.0  # classes 0 and 1 always tie: no beta leaves one class, no softmax exceeds 1/2
    final = F.one_hot(labels, k).float() * 5
    scores = _scores([tied.clone(), tied.clone(), tied.clone()], final, labels)
    search = search_thresholds(scores, rule, tolerance=0.5, step=0.05)
    assert search.steps == []
    assert search.thresholds == [DISABLED[rule]] * 3
    assert search.mean_macs == scores.full_macs == sum(UNITS) + CLASSIFIER
    assert search.accuracy == search.accuracy_full == 1.0


@pytest.mark.parametrize("rule", RULES)
def test_free_exclusion_is_found(rule):
    """Exit 0 is noise, exit 1 names the label with certainty: the cheapest lossless setting sends every sample out
    at exit 1 with exit 0 off (its head would only cost), which the search must find at tolerance 0."""
    n, k = 80, 4
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, k, (n,), generator=g)
    certain = (F.one_hot(labels, k).float() * 2 - 1) * 9  # +9 for the label, -9 for the others
    noise = torch.randn(n, k, generator=g) * 0.1
    final = F.one_hot(labels, k).float() * 4
    scores = _scores([noise, certain, certain.clone()], final, labels)
    search = search_thresholds(scores, rule, tolerance=0.0, step=0.05)
    assert search.accuracy == 1.0
    assert search.mean_macs == _cost(1, heads=[1])  # 350 + 11, against 653 for the full network
    assert search.thresholds[0] == DISABLED[rule] and search.thresholds[2] == DISABLED[rule]
    sim = simulate_exits(scores, search.thresholds, rule)
    assert sim.exit_indices.tolist() == [1] * n


@pytest.mark.parametrize("rule", RULES)
def test_latency_costs_change_what_is_cheapest(rule):
    """Exit 0 settles a quarter of the samples with certainty. In MACs its head (7) is cheap next to the 600 MACs a
    stop there saves, so the search turns it on; with a head that takes 5,000 ns per image against 10 ns per unit,
    evaluating it on every sample costs more than the stops save, so the latency search leaves it off. Either
    result reports its MACs, and the latency one its mean time."""
    n, k = 80, 4
    g = torch.Generator().manual_seed(6)
    labels = torch.randint(0, k, (n,), generator=g)
    certain = (F.one_hot(labels, k).float() * 2 - 1) * 9
    noise = torch.randn(n, k, generator=g) * 0.1
    first = torch.where((torch.arange(n) % 4 == 0)[:, None], certain, noise)
    final = F.one_hot(labels, k).float() * 4
    scores = _scores([first, noise.clone(), noise.clone()], final, labels)
    by_macs = search_thresholds(scores, rule, tolerance=0.0, step=0.05)
    assert by_macs.thresholds[0] != DISABLED[rule] and by_macs.mean_cost is None
    assert by_macs.mean_macs == pytest.approx((n // 4 * _cost(0, [0]) + 3 * n // 4 * (sum(UNITS) + CLASSIFIER + 7)) / n)

    costs = ExitCosts(units=[10] * len(UNITS), heads=[5000, 1, 1], classifier=2)
    by_time = search_thresholds(scores, rule, tolerance=0.0, step=0.05, costs=costs)
    assert by_time.thresholds == [DISABLED[rule]] * 3
    assert by_time.mean_cost == by_time.cost_full == 10 * len(UNITS) + 2
    assert by_time.mean_macs == by_time.macs_full == sum(UNITS) + CLASSIFIER  # MACs of the thresholds found
    assert by_time.accuracy == 1.0
    # A head that costs no more than a unit is worth it again: its samples skip 5 units.
    cheap = ExitCosts(units=[10] * len(UNITS), heads=[1, 1, 1], classifier=2)
    assert search_thresholds(scores, rule, tolerance=0.0, step=0.05, costs=cheap).thresholds[0] != DISABLED[rule]
    with pytest.raises(Exception, match="the costs cover 2 units"):
        search_thresholds(scores, rule, 0.0, 0.05, costs=ExitCosts(units=[1, 1], heads=[1, 1, 1], classifier=1))


def test_measured_latency_is_charged_to_the_module_that_spends_it(monkeypatch):
    """A unit made 50 ms slower per batch is charged at least 50 ms / batch per image; no other part is charged a
    sizeable share of it. (The bound on the others is loose on purpose: on a shared machine a preempted stem can take
    a few ms of one batch, and a ratio to those microsecond-scale parts would fail on that alone.)"""
    import time

    torch.manual_seed(0)
    model = ClassExitResNetForImageClassification(ClassExitResNetConfig(
        num_labels=4, embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1], exit_positions=["stage1"],
        exit_pool_size=2, exit_thresholds=[0.0])).eval()
    slow = list(model.resnet.units())[1]
    forward = slow.forward

    def slowed(hidden):
        time.sleep(0.05)
        return forward(hidden)

    monkeypatch.setattr(slow, "forward", slowed)
    data = ImageClassificationData(torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8), torch.arange(32) % 4,
                                   ["a", "b", "c", "d"])
    costs = measure_exit_costs(model, data, batch_size=16, max_batches=2, rounds=2)
    assert len(costs.units) == 3 and len(costs.heads) == 1 and costs.unit == "ns"
    sleep_per_image = 0.05e9 / 16
    assert costs.units[1] >= sleep_per_image
    assert max(costs.units[0], costs.units[2], costs.heads[0], costs.classifier) < sleep_per_image / 4


def test_exclusion_at_one_exit_is_credited_with_the_savings_at_the_next():
    """Exit 0 rules out all but classes 0 and 1 and stops nobody (0 and 1 tie). Exit 1 settles half the samples alone;
    for the other half it ranks the label first among 0 and 1 but below four classes exit 0 excludes. The search
    must see that turning exit 0 on (which costs its head and stops nobody there) lets that half leave at exit 1."""
    n, k = 40, 6
    labels = torch.arange(n) % 2
    first = torch.full((n, k), -8.0)
    first[:, :2] = 8.0
    second = torch.zeros(n, k)
    second[torch.arange(n), labels] = 3.0
    hard = torch.arange(n) >= n // 2
    second[hard, 2:] = 3.5
    final = F.one_hot(labels, k).float() * 5
    scores = _scores([first, second, torch.zeros(n, k)], final, labels)
    assert simulate_exits(scores, [0.9, 0.0, 0.0], "class_exclusion").exit_indices.tolist() == [3] * n
    alone = simulate_exits(scores, [0.0, 0.9, 0.0], "class_exclusion")
    assert alone.exit_indices.tolist() == [1] * (n // 2) + [3] * (n // 2) and alone.accuracy == 1.0
    for max_grid in (1, 4096):  # the coordinate descent alone (from the full network), and after the grid
        search = search_thresholds(scores, "class_exclusion", tolerance=0.0, step=0.05, max_grid=max_grid)
        assert search.accuracy == 1.0
        assert search.mean_macs == _cost(1, heads=[0, 1])  # 368, against (361 + 664) / 2 with exit 1 alone
        assert simulate_exits(scores, search.thresholds, "class_exclusion").exit_indices.tolist() == [1] * n
        if max_grid == 1:
            assert [step["exit"] for step in search.steps][-1] == 0  # exit 0 came on after exit 1, for its exclusions


def _exit_model(rule: str) -> ClassExitResNetForImageClassification:
    torch.manual_seed(0)
    config = ClassExitResNetConfig(num_labels=5, embedding_size=4, hidden_sizes=[4, 8], depths=[2, 2], exit_rule=rule,
                                   exit_positions=["stem", "stage1.1", "stage1", "stage2.1"], exit_pool_size=2,
                                   id2label={i: str(i) for i in range(5)}, label2id={str(i): i for i in range(5)})
    model = ClassExitResNetForImageClassification(config)
    with torch.no_grad():  # sharper heads, so that the exits decide some samples
        for head in model.exit_heads:
            head.classifier.weight.mul_(4.0)
    return model.eval()


def _data(n: int, seed: int = 0) -> ImageClassificationData:
    g = torch.Generator().manual_seed(seed)
    return ImageClassificationData(images=torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=g),
                                   labels=torch.randint(0, 5, (n,), generator=g), class_names=[str(i) for i in range(5)])


@pytest.mark.parametrize("rule", RULES)
def test_searched_macs_match_torch_flop_counter(rule):
    """The mean MACs the search reports for its thresholds equal what torch's FLOP counter measures when each image
    goes through the model's real early-exit forward on its own (2 FLOPs per multiply-add)."""
    model = _exit_model(rule)
    data = _data(24)
    scores = collect_exit_scores(model, data, batch_size=24)
    search = search_thresholds(scores, rule, tolerance=0.2, step=0.1)
    assert search.thresholds != [DISABLED[rule]] * 4
    model.config.exit_thresholds = list(search.thresholds)
    measured, exits = [], []
    for images, _ in data.batches(1):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            out = model(pixel_values=images)
        measured.append(counter.get_total_flops() // 2)
        exits.append(int(out.exit_indices[0]))
    assert sum(measured) / len(measured) == pytest.approx(search.mean_macs, rel=0, abs=1e-9)
    assert len(set(exits)) >= 2  # several exits used, so the count is not just the full network's
    sim = simulate_exits(scores, search.thresholds, rule)
    assert sim.macs.tolist() == measured and sim.exit_indices.tolist() == exits


def test_exit_head_loss_formula():
    torch.manual_seed(0)
    exits, labels = [torch.randn(6, 4), torch.randn(6, 4)], torch.tensor([0, 1, 2, 3, 0, 1])
    expected = 0.0
    for logits in exits:
        p, t = torch.sigmoid(logits), F.one_hot(labels, 4).float()
        expected = expected + (-(t * torch.log(p) + (1 - t) * torch.log(1 - p))).sum() / 6
    torch.testing.assert_close(exit_head_loss(exits, labels, "class_exclusion"), expected)
    confidence = sum(F.cross_entropy(logits, labels) for logits in exits)
    torch.testing.assert_close(exit_head_loss(exits, labels, "confidence"), confidence)


def test_head_training_leaves_the_backbone_untouched():
    """With the backbone frozen only the heads learn: every backbone weight, batch-norm statistic and the final
    classifier stay bit-identical (so does the full network), and the parameters are trainable again afterwards."""
    model = _exit_model("class_exclusion")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = next(_data(8, seed=2).batches(8))[0]
    with torch.no_grad():
        full_before = model(pixel_values=images, early_exit=False).logits
    config = EarlyExitConfig(epochs=1, lr=0.1, batch_size=16, seed=0, train_backbone=False)
    history = train_exits(model, _data(48, seed=1), config, progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("exit_heads.") for k in changed)  # BN running statistics included
    assert {f"exit_heads.{i}.classifier.weight" for i in range(4)} <= changed
    with torch.no_grad():
        assert torch.equal(model(pixel_values=images, early_exit=False).logits, full_before)
    assert len(history["train_loss"]) == 1
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again for whoever trains it next


def test_joint_training_trains_the_backbone():
    model = _exit_model("class_exclusion")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_exits(model, _data(48, seed=1), EarlyExitConfig(epochs=1, lr=0.1, batch_size=16, seed=0), progress=False)
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert any(k.startswith("resnet.") for k in changed) and "classifier.1.weight" in changed


@pytest.mark.parametrize("rule", RULES)
def test_frozen_head_loss_through_a_data_parallel_wrapper(rule):
    """Wrapped for data parallelism, the frozen heads' logits go through the wrapper (so gradients are
    synchronised) and equal the direct computation; the loss is `exit_head_loss` of them."""

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            self.calls = getattr(self, "calls", 0) + 1
            return self.module(*args, **kwargs)

    model = _exit_model(rule).train()
    images, labels = next(_data(10, seed=3).batches(10))
    wrapper = Wrapper(model)
    direct = frozen_exit_logits(model, images)
    wrapped = frozen_exit_logits(wrapper, images)
    assert wrapper.calls == 1 and not model.resnet.training
    for a, b in zip(direct, wrapped):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(heads_loss_fn(wrapper, images, labels), exit_head_loss(direct, labels, rule))
