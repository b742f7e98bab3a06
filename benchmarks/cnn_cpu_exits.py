"""Stage "exits" of protocol "cifar-cpu" (BENCHMARKS.md): early exit with class exclusion against confidence
(max-softmax) exits on the trained ResNet-20 baselines, seeds 2023 and 2024.

Each seed starts from its baseline checkpoint `results/cnn_cpu/resnet20-seed<seed>` (stage "baseline"). Exits are
attached at the method's default positions (after the middle and the last block of every stage but the network's
end: stage1.2, stage1, stage2.2, stage2, stage3.2; adaptive average pooling to 2x2 and one linear layer), and each
rule gets the same training (`hf_compress.early_exit.training.train_exits`): by default the method's joint training
of backbone and heads, `--epochs` 10 epochs of the 45,000 training images at peak lr `--lr` 0.01 (cosine to zero, no
warm-up), batch 128, SGD with Nesterov momentum 0.9 and weight decay 5e-4, the protocol's augmentation, channels_last,
bfloat16 autocast where the CPU multiplies it natively; cross-entropy on the final output plus the weighted exit
losses (class exclusion: binary cross-entropy per class; confidence: cross-entropy). `--training frozen` trains the
heads alone on the frozen baseline instead (both rules' heads on the same forward passes), so that the full network
is the baseline itself.

Thresholds are chosen on the 5,000 validation images (held out with seed 2023), never on test, by
`hf_compress.early_exit.search.search_thresholds` at each tolerance (0.002, 0.005, 0.01 of accuracy): the cheapest
setting of an exhaustive sub-grid (`--max-grid` settings, evaluated once per rule), then coordinate moves that each
lower the mean MACs while staying within the tolerance; each tolerance also continues from the smaller one's result,
so a larger tolerance is never dearer. The chosen settings are measured on the 10,000 test images by real batched
inference of the model at batch 256 (float32): accuracy, mean MACs per image (exit heads included), exit histogram,
the test errors the exits add (samples the full network gets right lost at an early stop, or lost because their
class was excluded before the final classifier), and wall-clock throughput against the full network (the same model
with every exit off), timed in the same run batch by batch in rotation so that load from other processes hits every
configuration alike. The accuracy-vs-MACs curve of each rule over its thresholds (the validation Pareto front of the
grid, replayed on test, and one threshold shared by all exits) is drawn into one PNG per rule.

Resumable: training states (after every epoch), trained models and finished seeds are kept under
`--work-dir/exits-resnet20-seed<seed>/<training>/`, so the stage may be stopped at any time and run again.

    python benchmarks/bench_cnn_cpu.py exits --seed 2023 --seed 2024

CPU time on 2 cores: joint training costs about one baseline epoch per epoch and rule (3 to 4 minutes on a loaded
machine), so 10 epochs x 2 rules x 2 seeds is 2 to 2.5 hours; scores, searches and timing add about 15 minutes per
seed. `--training frozen` needs about a third of an epoch's time per head epoch (both rules at once): about an hour
in all.

`--cost latency` searches the thresholds for the least time per image measured on this machine (each unit, head
and the final classifier timed on validation images) instead of the fewest MACs; it reuses the trained models and
keeps its finished seeds in `result-latency.json` beside the MAC search's. Pass `--results-dir` to keep its tables
apart from the protocol's:

    python benchmarks/bench_cnn_cpu.py exits --cost latency --results-dir benchmarks/results/cnn_cpu_exits_latency

Writes `results/cnn_cpu_exits.json` (one row per seed, rule and tolerance, with the curves), `.md`,
`results/cnn_cpu_exits_class_exclusion.png`, `results/cnn_cpu_exits_confidence.png`, and the
`exits_<rule>_tol<tolerance>_{macs_reduction,test_acc,speedup}` entries (mean over seeds, and `_per_seed`) of
`results/cnn_cpu_summary.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common / bench_cnn_cpu when imported from elsewhere

from bench_common import RESULTS, add_cifar_cpu_arguments, device_note, mean, seed_summary  # noqa: E402

from hf_compress import __version__  # noqa: E402
from hf_compress.checkpoint import atomic_write_json, atomic_write_text  # noqa: E402
from hf_compress.data.images import ImageClassificationData, load_image_dataset, train_val_split  # noqa: E402
from hf_compress.device import native_bfloat16  # noqa: E402
from hf_compress.early_exit.config import EarlyExitConfig  # noqa: E402
from hf_compress.early_exit.heads import load_exit_model  # noqa: E402
from hf_compress.early_exit.latency import ModuleTimer, measure_exit_costs, timed_modules  # noqa: E402
from hf_compress.early_exit.search import (  # noqa: E402
    ExitCosts,
    ExitScores,
    ThresholdSearch,
    collect_exit_scores,
    disabled_threshold,
    search_thresholds,
    simulate_exits,
)
from hf_compress.early_exit.training import exit_head_loss, frozen_exit_features, train_exits  # noqa: E402
from hf_compress.errors import HFCompressError  # noqa: E402
from hf_compress.modeling.class_exit_resnet import ClassExitResNetForImageClassification  # noqa: E402

RULES = ("class_exclusion", "confidence")
LABELS = {"class_exclusion": "class exclusion", "confidence": "confidence (max softmax)"}
TOLERANCES = (0.002, 0.005, 0.01)
STEM = "cnn_cpu_exits"
# What the stage must show (the protocol's target for this comparison).
TARGET = {"rule": "class_exclusion", "macs_reduction": 0.30, "max_accuracy_drop": 0.005, "speedup": 1.2}
# One threshold shared by every exit, for the curves.
UNIFORM = {
    "class_exclusion": [0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995],
    "confidence": [0.9999, 0.999, 0.998, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
}
# Accuracy losses (points below the baseline's test accuracy) at which the curves are compared.
CURVE_DROPS = (0.002, 0.005, 0.01)


def _protocol() -> dict[str, Any]:
    # Imported on use: bench_cnn_cpu imports this module to dispatch to it.
    from bench_cnn_cpu import PROTOCOL

    return PROTOCOL


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of stage "exits" (their defaults are the protocol's budget)."""
    group = add_cifar_cpu_arguments(parser, "stage exits",
                                    "training states, trained models and finished seeds, for resuming")
    group.add_argument("--rule", action="append", choices=RULES, help="repeatable (default both)")
    group.add_argument("--tolerance", action="append", type=float,
                       help="validation accuracy the exits may lose, repeatable (default "
                            f"{' '.join(map(str, TOLERANCES))})")
    group.add_argument("--training", choices=["joint", "frozen"], default="joint",
                       help="exit training: backbone and heads jointly (the method's default), or the heads alone on "
                            "the frozen baseline")
    group.add_argument("--epochs", type=int, default=10, help="exit training epochs (every rule the same)")
    group.add_argument("--lr", type=float, default=0.01, help="peak lr of exit training (cosine to zero)")
    group.add_argument("--exit-pool-size", type=int, default=2, help="pooled side of each exit head")
    group.add_argument("--step", type=float, default=0.01,
                       help="threshold search resolution (share of validation images between candidates)")
    group.add_argument("--cost", choices=["macs", "latency"], default="macs",
                       help="what the threshold search minimises: MACs, or the time per image of each unit and head "
                            "measured on this machine (on validation images) before the search")
    group.add_argument("--max-grid", type=int, default=1024,
                       help="threshold settings evaluated exhaustively before the coordinate search")
    group.add_argument("--throughput-batch", type=int, default=256)
    group.add_argument("--speed-rounds", type=int, default=3, help="timed passes over the test batches")
    group.add_argument("--throughput-batches", type=int, default=None, help="time at most this many test batches")
    group.add_argument("--progress", action="store_true", help="progress bars")


# ------------------------------------------------------------------------------------------------------- helpers
def _load_splits(args) -> tuple[ImageClassificationData, ImageClassificationData, ImageClassificationData]:
    """The protocol's splits: 45,000 train / 5,000 validation (seed 2023) / 10,000 test (limits at reduced scale)."""
    p = _protocol()
    train_all = load_image_dataset("cifar10", "train", limit=args.train_limit, seed=p["split_seed"])
    train, val = train_val_split(train_all, n_val=args.val_size or p["val_images"], seed=p["split_seed"])
    test = load_image_dataset("cifar10", "test", limit=args.test_limit, seed=p["split_seed"])
    return train, val, test


def _training_settings(args, seed: int, train_size: int) -> dict[str, Any]:
    """What the trained models depend on (models stored with other settings are not reused)."""
    return {"seed": seed, "training": args.training, "epochs": args.epochs, "lr": args.lr,
            "exit_pool_size": args.exit_pool_size, "train_size": train_size}


def _exit_config(args, seed: int, rule: str) -> EarlyExitConfig:
    p = _protocol()
    return EarlyExitConfig(exit_rule=rule, epochs=args.epochs, lr=args.lr, batch_size=p["batch_size"], seed=seed,
                           exit_pool_size=args.exit_pool_size, train_backbone=args.training == "joint")


def _train_kwargs(bf16: bool) -> dict[str, Any]:
    p = _protocol()
    return {"bf16": bf16, "channels_last": p["channels_last"], "momentum": p["momentum"], "nesterov": p["nesterov"],
            "weight_decay": p["weight_decay"], "schedule": "cosine", "warmup_epochs": 0}


def _paired_loss(model, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`loss_fn` training every rule's heads on one frozen forward: the model's own heads with its rule's loss, and
    the heads of the other rules, attached as `paired_<rule>`, with theirs."""
    model = getattr(model, "module", model)
    features = frozen_exit_features(model, images)
    loss = exit_head_loss([head(f) for head, f in zip(model.exit_heads, features)], labels, model.config.exit_rule)
    for name, heads in model.named_children():
        if name.startswith("paired_"):
            loss = loss + exit_head_loss([head(f) for head, f in zip(heads, features)], labels, name[len("paired_"):])
    return loss


def _trained_models(args, seed: int, rules: list[str], baseline: Path, train: ImageClassificationData, bf16: bool,
                    folder: Path) -> tuple[dict[str, ClassExitResNetForImageClassification], float]:
    """The baseline with each rule's exits, trained (or loaded from `folder` when trained before with the same
    settings); returns them and the seconds this call trained.

    Joint training trains one model per rule. With the backbone frozen, the heads of every rule are trained together
    on the same forward passes (the same batches, augmentation and schedule, each head with its rule's loss).
    """
    settings = _training_settings(args, seed, len(train))
    models: dict[str, ClassExitResNetForImageClassification] = {}
    missing = []
    for rule in rules:
        stamp = folder / "models" / rule / "stage.json"
        if stamp.is_file() and json.loads(stamp.read_text()) == settings:
            models[rule] = ClassExitResNetForImageClassification.from_pretrained(folder / "models" / rule).eval()
        else:
            missing.append(rule)
    if not missing:
        return models, 0.0
    fresh = {rule: load_exit_model(baseline, exit_rule=rule, exit_pool_size=args.exit_pool_size) for rule in missing}
    start = time.time()
    if args.training == "joint":
        for rule, model in fresh.items():
            train_exits(model, train, _exit_config(args, seed, rule), progress=args.progress,
                        resume_dir=folder / "training" / rule, **_train_kwargs(bf16))
    else:
        carrier = fresh[missing[0]]
        for rule in missing[1:]:
            carrier.add_module(f"paired_{rule}", fresh[rule].exit_heads)  # the same modules: trained in place
        try:
            train_exits(carrier, train, _exit_config(args, seed, missing[0]), progress=args.progress,
                        loss_fn=_paired_loss, resume_dir=folder / "training" / "+".join(missing),
                        **_train_kwargs(bf16))
        finally:
            for rule in missing[1:]:
                delattr(carrier, f"paired_{rule}")
    seconds = time.time() - start
    for rule, model in fresh.items():
        model.eval().save_pretrained(folder / "models" / rule)
        (folder / "models" / rule / "stage.json").write_text(json.dumps(settings))  # last: the model is complete
        models[rule] = model
    return models, seconds


def _histogram(exit_indices: torch.Tensor, names: list[str]) -> dict[str, float]:
    shares = torch.bincount(exit_indices, minlength=len(names)).double() / len(exit_indices)
    return {name: float(v) for name, v in zip(names, shares)}


def _errors(scores: ExitScores, thresholds: list[float], rule: str) -> dict[str, int]:
    """What early exit changes against the full network, in samples: those it gets right that early exit loses at
    an early stop, those it loses because their class was excluded before the final classifier, and those early
    exit gets right that the full network does not."""
    sim = simulate_exits(scores, thresholds, rule)
    full_right = scores.final_logits.argmax(1) == scores.labels
    right = sim.predictions == scores.labels
    early = sim.exit_indices < len(scores.exit_logits)
    return {"lost_at_early_stops": int((full_right & ~right & early).sum()),
            "lost_to_excluded_classes": int((full_right & ~right & ~early).sum()),
            "gained": int((~full_right & right).sum())}


@torch.no_grad()
def timed_inference(configs: list[tuple[str, ClassExitResNetForImageClassification, list[float]]],
                    test: ImageClassificationData, *, batch_size: int, rounds: int, max_batches: int | None = None,
                    module_times: bool = False) -> dict[str, dict[str, Any]]:
    """Real batched inference of every configuration `(name, model, thresholds)` on the test batches, float32.

    Every batch is run by every configuration in turn (the order rotating from batch to batch), so that what other
    processes do to the machine hits them alike; images/s = timed images / summed seconds over `rounds` passes. The
    first pass runs every test batch and records each configuration's predictions, exits and MACs; only the first
    `max_batches` batches (all by default) are timed. With `module_times`, forward hooks (`ModuleTimer`) also add up
    the seconds and images of every unit, exit head and the final classifier in the timed forwards (`seconds`,
    `module_images`).
    """
    batches = [images for images, _ in test.batches(batch_size)]
    timed = batches[:max_batches]
    timed_images = rounds * sum(len(images) for images in timed)
    labels = test.labels
    timers = ({id(model): ModuleTimer(timed_modules(model)) for _, model, _ in configs} if module_times else {})
    seconds = {name: 0.0 for name, *_ in configs}
    outputs: dict[str, list] = {name: [] for name, *_ in configs}
    try:
        for name, model, thresholds in configs:  # warm-up
            model.eval().config.exit_thresholds = list(thresholds)
            model(pixel_values=batches[0])
        for timer in timers.values():
            timer.reset()
        for round_ in range(rounds):
            for index, images in enumerate(batches if round_ == 0 else timed):
                shift = (index + round_) % len(configs)
                for name, model, thresholds in configs[shift:] + configs[:shift]:
                    model.config.exit_thresholds = list(thresholds)
                    if timers:  # the untimed batches of the first pass are charged to a label no result reads
                        timers[id(model)].current = name if index < len(timed) else ""
                    start = time.perf_counter()
                    out = model(pixel_values=images)
                    if index < len(timed):
                        seconds[name] += time.perf_counter() - start
                    if round_ == 0:
                        outputs[name].append(out)
    finally:
        for timer in timers.values():
            timer.remove()
    result = {}
    for name, model, _ in configs:
        outs = outputs[name]
        predictions = torch.cat([o.logits.argmax(1) for o in outs])
        macs = torch.cat([o.macs for o in outs])
        result[name] = {
            "images_per_s": timed_images / seconds[name], "wall_s": seconds[name], "timed_images": timed_images,
            "accuracy": int((predictions == labels).sum()) / len(labels), "mean_macs": int(macs.sum()) / len(labels),
            "exit_indices": torch.cat([o.exit_indices for o in outs]),
        }
        if timers:
            timer = timers[id(model)]
            result[name].update(seconds=dict(timer.seconds[name]), module_images=dict(timer.images[name]))
    return result


def _uniform_curve(scores: ExitScores, rule: str) -> list[dict[str, float]]:
    """Test accuracy and MACs saved with one threshold at every exit, over `UNIFORM[rule]`."""
    points = []
    for value in UNIFORM[rule]:
        sim = simulate_exits(scores, [value] * len(scores.exit_logits), rule)
        points.append({"threshold": value, "accuracy": sim.accuracy,
                       "macs_reduction": 1 - sim.mean_macs / scores.full_macs})
    return points


def _front_curve(search: ThresholdSearch, val: ExitScores, test: ExitScores, rule: str) -> list[dict[str, Any]]:
    """The validation Pareto front of the search's grid (every setting more accurate on validation than every
    cheaper one), each replayed on the test logits."""
    grid, n = search.grid, len(val.labels)
    points = []
    for row in grid.frontier():
        thresholds = grid.thresholds(row)
        sim = simulate_exits(test, thresholds, rule)
        points.append({"thresholds": thresholds, "val_accuracy": int(grid.correct[row]) / n,
                       "val_macs_reduction": 1 - int(grid.totals[row]) / n / val.full_macs,
                       "accuracy": sim.accuracy, "macs_reduction": 1 - sim.mean_macs / test.full_macs})
    return points


def _search_chain(val: ExitScores, rule: str, tolerances: list[float], args,
                  costs: ExitCosts | None = None) -> dict[float, ThresholdSearch]:
    """The searches at every tolerance in increasing order, sharing one grid evaluation, each also continuing from
    the previous result (feasible at a larger tolerance), so a larger tolerance is never dearer."""
    searches, previous, grid = {}, None, None
    for tolerance in sorted(tolerances):
        search = search_thresholds(val, rule, tolerance, args.step, start=previous, max_grid=args.max_grid, grid=grid,
                                   costs=costs)
        grid, previous = search.grid, search.thresholds
        searches[tolerance] = search
    return searches


def _at_drops(points: list[dict[str, Any]], reference: float) -> dict[str, float | None]:
    """The most MACs saved on a test curve at each accuracy of `CURVE_DROPS` below `reference` (None: no point)."""
    best = {}
    for drop in CURVE_DROPS:
        saving = [p["macs_reduction"] for p in points if p["accuracy"] >= reference - drop - 1e-12]
        best[str(drop)] = max(saving) if saving else None
    return best


# ---------------------------------------------------------------------------------------------------- per seed
def _seed_result(args, seed: int, rules: list[str], tolerances: list[float], splits, bf16: bool,
                 baselines: Path) -> dict[str, Any]:
    """Everything measured for one seed (loaded from `--work-dir` when this seed finished before)."""
    train, val, test = splits
    folder = Path(args.work_dir).expanduser() / f"exits-resnet20-seed{seed}" / args.training
    settings = {"rules": rules, "tolerances": sorted(tolerances), "step": args.step, "max_grid": args.max_grid,
                "throughput_batch": args.throughput_batch, "speed_rounds": args.speed_rounds,
                "throughput_batches": args.throughput_batches, "test_size": len(test), "val_size": len(val),
                "training": _training_settings(args, seed, len(train))}
    if args.cost != "macs":  # stamps and results of the MAC search stay valid
        settings["cost"] = args.cost
    done = folder / ("result.json" if args.cost == "macs" else f"result-{args.cost}.json")
    if done.is_file():
        stored = json.loads(done.read_text())
        if stored["settings"] == settings:
            print(f"seed {seed}: already measured", flush=True)
            return stored
    baseline = baselines / f"resnet20-seed{seed}"
    if not (baseline / "config.json").is_file():
        raise HFCompressError(f"no baseline checkpoint at {baseline}: run stage 'baseline' for seed {seed} first")
    baseline_acc = None
    if args.training == "joint":  # the baseline's own test accuracy, before the backbone is trained further
        baseline_acc = collect_exit_scores(load_exit_model(baseline, exit_positions=[]), test).full_accuracy
    models, train_seconds = _trained_models(args, seed, rules, baseline, train, bf16, folder)
    print(f"seed {seed}: exits trained ({train_seconds / 60:.1f} min this call)", flush=True)
    names = [*models[rules[0]].config.exit_positions, "final"]
    val_scores, test_scores, searches, costs = {}, {}, {}, {}
    for rule in rules:
        val_scores[rule] = collect_exit_scores(models[rule], val)
        test_scores[rule] = collect_exit_scores(models[rule], test)
        # Timed on validation images, float32, at the batch the test inference is timed at.
        costs[rule] = (measure_exit_costs(models[rule], val, batch_size=args.throughput_batch)
                       if args.cost == "latency" else None)
        start = time.time()
        searches[rule] = _search_chain(val_scores[rule], rule, tolerances, args, costs[rule])
        if baseline_acc is None:  # frozen: the full network is the baseline
            baseline_acc = test_scores[rule].full_accuracy
        print(f"seed {seed} {rule}: exit heads' validation accuracy " + ", ".join(
              f"{float((logits.argmax(1) == val.labels).float().mean()):.3f}" for logits in val_scores[rule].exit_logits)
              + f"; thresholds searched in {time.time() - start:.0f} s", flush=True)
    # The full network of each model: every exit off (no head evaluated). Frozen training leaves one backbone.
    full_of = {rule: ("full" if args.training == "frozen" else f"full:{rule}") for rule in rules}
    configs = []
    for rule in rules:
        if not any(name == full_of[rule] for name, *_ in configs):
            configs.append((full_of[rule], models[rule], [disabled_threshold(rule)] * (len(names) - 1)))
    for rule in rules:
        for tolerance, search in searches[rule].items():
            configs.append((f"{rule}@{tolerance}", models[rule], search.thresholds))
    timed = timed_inference(configs, test, batch_size=args.throughput_batch, rounds=args.speed_rounds,
                            max_batches=args.throughput_batches)
    rows = []
    for rule in rules:
        full = timed[full_of[rule]]
        for tolerance, search in searches[rule].items():
            real = timed[f"{rule}@{tolerance}"]
            replay = simulate_exits(test_scores[rule], search.thresholds, rule)
            macs_full = test_scores[rule].full_macs
            row = {
                "seed": seed, "rule": rule, "tolerance": tolerance, "thresholds": search.thresholds,
                "val_accuracy_full": search.accuracy_full, "val_accuracy": search.accuracy,
                "val_macs_reduction": 1 - search.mean_macs / search.macs_full,
                "grid_settings": search.grid_settings, "search_moves": len(search.steps),
                "baseline_test_acc": baseline_acc, "test_acc_full": full["accuracy"], "test_acc": real["accuracy"],
                "macs_full": macs_full, "mean_macs": real["mean_macs"],
                "macs_reduction": 1 - real["mean_macs"] / macs_full,
                "exit_histogram": _histogram(real["exit_indices"], names),
                "test_errors": _errors(test_scores[rule], search.thresholds, rule),
                "images_per_s": real["images_per_s"], "images_per_s_full": full["images_per_s"],
                "speedup": real["images_per_s"] / full["images_per_s"],
                # the replay on cached logits (what the search computes), against the real batched inference
                "replay_test_acc": replay.accuracy, "replay_mean_macs": replay.mean_macs,
            }
            rows.append(row)
            print(f"seed {seed} {LABELS[rule]} tolerance {tolerance}: test {100 * row['test_acc']:.2f}% (full "
                  f"{100 * row['test_acc_full']:.2f}%, baseline {100 * baseline_acc:.2f}%), MACs "
                  f"-{100 * row['macs_reduction']:.1f}%, speedup {row['speedup']:.2f}x", flush=True)
    curves = {}
    for rule in rules:
        largest = searches[rule][max(tolerances)]
        # With measured costs the grid's totals are nanoseconds: its validation reductions are taken in them.
        grid_val = costs[rule].applied_to(val_scores[rule]) if costs[rule] is not None else val_scores[rule]
        front = _front_curve(largest, grid_val, test_scores[rule], rule)
        chosen = [{"tolerance": r["tolerance"], "accuracy": r["test_acc"], "macs_reduction": r["macs_reduction"]}
                  for r in rows if r["rule"] == rule]
        curves[rule] = {"front": front, "uniform": _uniform_curve(test_scores[rule], rule),
                        "at_drops": _at_drops(front + chosen, baseline_acc)}
    result = {
        "settings": settings, "seed": seed, "rows": rows, "curves": curves,
        "head_val_accuracy": {rule: [float((logits.argmax(1) == val.labels).float().mean())
                                     for logits in val_scores[rule].exit_logits] for rule in rules},
        "exit_positions": names[:-1], "train_seconds_last_call": train_seconds, "baseline_test_acc": baseline_acc,
        "search_cost": args.cost,
        "costs_ns": {rule: dataclasses.asdict(c) for rule, c in costs.items() if c is not None},
        "device": device_note(), "note": args.note,
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(done, result)
    return result


# ------------------------------------------------------------------------------------------------------- outputs
def _summary_entries(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`exits_<rule>_tol<tolerance>_<figure>` (mean over seeds) and `..._per_seed` for the summary file."""
    entries: dict[str, Any] = {}
    for rule in RULES:
        for tolerance in sorted({r["tolerance"] for r in rows}):
            mine = [r for r in rows if r["rule"] == rule and r["tolerance"] == tolerance]
            if mine:
                figures = ("macs_reduction", "test_acc", "speedup")
                entries.update(seed_summary(mine, f"exits_{rule}_tol{tolerance}", figures))
    return entries


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _target_met(rows: list[dict[str, Any]]) -> bool:
    """The target on the mean over seeds: >= 30% fewer mean MACs within 0.5 points of the full network, and a
    measured speedup >= 1.2x."""
    saved, speedup = mean([r["macs_reduction"] for r in rows]), mean([r["speedup"] for r in rows])
    drop = mean([r["test_acc_full"] - r["test_acc"] for r in rows])
    return saved >= TARGET["macs_reduction"] and drop <= TARGET["max_accuracy_drop"] and speedup >= TARGET["speedup"]


def _markdown(report: dict[str, Any]) -> str:
    scale, budget, rows = report["scale"], report["budget"], report["rows"]
    training = ("backbone and heads jointly" if budget["training"] == "joint"
                else "the heads alone on the frozen baseline")
    lines = [
        "# Early exit with class exclusion vs confidence exits, ResNet-20, protocol \"cifar-cpu\"", "",
        f"Scale: {scale['train_images']} train / {scale['val_images']} validation / {scale['test_images']} test "
        f"images{' (REDUCED)' if report['reduced'] else ''}. Exits at {', '.join(report['exit_positions'])} "
        f"(pool {budget['exit_pool_size']}x{budget['exit_pool_size']}, one linear layer); training: {training}, "
        f"{budget['epochs']} epochs, lr {budget['lr']} cosine, the same for both rules "
        f"({budget['training_precision']}). Thresholds searched on validation"
        f"{' for the least measured time per image (search cost: latency)' if budget.get('search_cost') == 'latency' else ''}"
        f"; figures on test by real batched "
        f"inference (batch {budget['throughput_batch']}, float32), timed against the full network (every exit off) "
        f"in the same run. MACs per image include the exit heads evaluated. Device: {report['device']}.", "",
        "## Mean over seeds", "",
        "| rule | tolerance | test acc baseline / full / exits | Δ vs full (points) | MACs saved | speedup | "
        "target met |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule in RULES:
        for tolerance in report["tolerances"]:
            mine = [r for r in rows if r["rule"] == rule and r["tolerance"] == tolerance]
            if not mine:
                continue
            base, full = mean([r["baseline_test_acc"] for r in mine]), mean([r["test_acc_full"] for r in mine])
            acc = mean([r["test_acc"] for r in mine])
            saved, speedup = mean([r["macs_reduction"] for r in mine]), mean([r["speedup"] for r in mine])
            met = "yes" if _target_met(mine) else "no"
            lines.append(f"| {LABELS[rule]} | {tolerance} | {_pct(base, 2)} / {_pct(full, 2)} / {_pct(acc, 2)} | "
                         f"{100 * (acc - full):+.2f} | {_pct(saved)} | {speedup:.2f}x | "
                         f"{met if rule == TARGET['rule'] else '-'} |")
    lines += [
        "", f"Target ({LABELS[TARGET['rule']]}): at least {_pct(TARGET['macs_reduction'], 0)} fewer mean MACs within "
        f"{100 * TARGET['max_accuracy_drop']:.1f} points of the full network, ahead of the confidence rule at equal "
        f"accuracy, and a wall-clock speedup of at least {TARGET['speedup']}x at batch {budget['throughput_batch']}.",
        "", "## Per seed", "",
        "| seed | rule | tolerance | thresholds | val acc full / exits | test acc full / exits | mean MACs | "
        "MACs saved | img/s full / exits | speedup | test samples lost at stops / to excluded classes / gained | "
        "exit histogram |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        histogram = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["exit_histogram"].items())
        thresholds = ", ".join(f"{t:.3g}" for t in r["thresholds"])
        e = r["test_errors"]
        lines.append(
            f"| {r['seed']} | {LABELS[r['rule']]} | {r['tolerance']} | {thresholds} | "
            f"{_pct(r['val_accuracy_full'], 2)} / {_pct(r['val_accuracy'], 2)} | {_pct(r['test_acc_full'], 2)} / "
            f"{_pct(r['test_acc'], 2)} | {r['mean_macs'] / 1e6:.2f}M | {_pct(r['macs_reduction'])} | "
            f"{r['images_per_s_full']:.0f} / {r['images_per_s']:.0f} | {r['speedup']:.2f}x | "
            f"{e['lost_at_early_stops']} / {e['lost_to_excluded_classes']} / {e['gained']} | {histogram} |")
    lines += [
        "", "## The curves at equal accuracy", "",
        "Most test MACs saved on each rule's curve (the validation Pareto front of its threshold grid replayed on "
        "test, and the chosen settings) at a test accuracy at most so far below the baseline's. Read off the test "
        "split, so descriptive only: thresholds are chosen on validation.", "",
        "| seed | rule | " + " | ".join(f"-{100 * d:.1f} points" for d in CURVE_DROPS) + " |",
        "|---|---|" + "---|" * len(CURVE_DROPS),
    ]
    for seed, per_rule in report["curves"].items():
        for rule, curve in per_rule.items():
            lines.append(f"| {seed} | {LABELS[rule]} | " + " | ".join(
                _pct(curve["at_drops"][str(d)]) for d in CURVE_DROPS) + " |")
    lines += ["", "## Validation accuracy of each exit head alone", "", "| seed | rule | " +
              " | ".join(report["exit_positions"]) + " |", "|---|---|" + "---|" * len(report["exit_positions"])]
    for seed, per_rule in report["head_val_accuracy"].items():
        for rule, accs in per_rule.items():
            lines.append(f"| {seed} | {LABELS[rule]} | " + " | ".join(_pct(a) for a in accs) + " |")
    lines += ["", "Curves (test accuracy against MACs saved, over the thresholds): " + ", ".join(
        f"[{LABELS[rule]}]({STEM}_{rule}.png)" for rule in report["rules"]) + "."]
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], results: Path) -> None:
    """One PNG per rule: test accuracy against MACs saved over the rule's thresholds (the validation Pareto front of
    its grid replayed on test, and one threshold shared by every exit), per seed, with the other rule's front for
    reference and the chosen tolerances marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for rule in report["rules"]:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for index, (seed, curves) in enumerate(report["curves"].items()):
            color = f"C{index}"
            front, uniform = curves[rule]["front"], curves[rule]["uniform"]
            ax.plot([100 * p["macs_reduction"] for p in front], [100 * p["accuracy"] for p in front], "-o", ms=2.5,
                    color=color, label=f"seed {seed}: thresholds on the validation front")
            ax.plot([100 * p["macs_reduction"] for p in uniform], [100 * p["accuracy"] for p in uniform], ":s", ms=3,
                    color=color, label=f"seed {seed}: one threshold at every exit")
            for other in report["rules"]:
                if other != rule:
                    points = curves[other]["front"]
                    ax.plot([100 * p["macs_reduction"] for p in points], [100 * p["accuracy"] for p in points],
                            "--", color=color, alpha=0.35, label=f"seed {seed}: {LABELS[other]} (front)")
            chosen = [r for r in report["rows"] if r["rule"] == rule and str(r["seed"]) == str(seed)]
            ax.scatter([100 * r["macs_reduction"] for r in chosen], [100 * r["test_acc"] for r in chosen], marker="*",
                       s=120, color=color, zorder=5, edgecolor="black",
                       label=f"seed {seed}: tolerances {', '.join(str(r['tolerance']) for r in chosen)}")
            if chosen:
                ax.axhline(100 * (chosen[0]["test_acc_full"] - TARGET["max_accuracy_drop"]), color=color, lw=0.6,
                           alpha=0.5)
        ax.axvline(100 * TARGET["macs_reduction"], color="gray", lw=0.6)
        ax.set_xlabel("mean MACs saved per test image (%, exit heads included)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"ResNet-20, CIFAR-10, {LABELS[rule]}: accuracy vs MACs over the thresholds", fontsize=10)
        ax.legend(fontsize=6, loc="lower left")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(results / f"{STEM}_{rule}.png", dpi=120)
        plt.close(fig)


def _write_outputs(report: dict[str, Any], results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(results / f"{STEM}.json", report)
    atomic_write_text(results / f"{STEM}.md", _markdown(report))
    _plot(report, results)
    entries = _summary_entries(report["rows"])
    if results.resolve() == RESULTS.resolve():
        from bench_cnn_cpu import update_summary

        update_summary("resnet20", entries)
    else:  # a reduced-scale run keeps its summary beside its other results
        path = results / "cnn_cpu_summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {"protocol": "cifar-cpu", "networks": {}}
        summary["networks"].setdefault("resnet20", {}).update(entries)
        atomic_write_json(path, summary)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Stage "exits": trains or loads every rule's exits for every seed of `args`, measures, writes the results."""
    seeds = args.seed or [2023, 2024]
    rules = args.rule or list(RULES)
    tolerances = sorted(set(args.tolerance or TOLERANCES))
    results = Path(args.results_dir) if args.results_dir else RESULTS
    reduced = any(v is not None for v in (args.train_limit, args.val_size, args.test_limit))
    if reduced and results.resolve() == RESULTS.resolve():
        raise SystemExit("a reduced-scale run (--train-limit/--val-size/--test-limit) must not write the protocol's "
                         "results: pass --results-dir")
    splits = _load_splits(args)
    bf16 = native_bfloat16(torch.device("cpu"))
    baselines = Path(args.baseline_dir) if args.baseline_dir else results / "cnn_cpu"
    per_seed = [_seed_result(args, seed, rules, tolerances, splits, bf16, baselines) for seed in seeds]
    train, val, test = splits
    report = {
        "protocol": _protocol(), "stage": "exits", "reduced": reduced, "rules": rules, "tolerances": tolerances,
        "scale": {"train_images": len(train), "val_images": len(val), "test_images": len(test)},
        "budget": {"training": args.training, "epochs": args.epochs, "lr": args.lr,
                   "exit_pool_size": args.exit_pool_size, "training_precision": "bfloat16" if bf16 else "float32",
                   "inference_precision": "float32", "step": args.step, "max_grid": args.max_grid,
                   "search_cost": args.cost,
                   "throughput_batch": args.throughput_batch, "speed_rounds": args.speed_rounds,
                   "estimate": "joint: one epoch per rule costs about one baseline epoch (3-4 min on 2 loaded "
                               "cores), 2-2.5 h for 10 epochs x 2 rules x 2 seeds, plus about 15 min per seed for "
                               "scores, searches and timing; frozen: about 1 h in all"},
        "exit_positions": per_seed[0]["exit_positions"],
        "target": TARGET, "device": device_note(), "hf_compress_version": __version__, "note": args.note,
        "rows": [row for result in per_seed for row in result["rows"]],
        "curves": {str(result["seed"]): result["curves"] for result in per_seed},
        "head_val_accuracy": {str(result["seed"]): result["head_val_accuracy"] for result in per_seed},
    }
    _write_outputs(report, results)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    run(args)


if __name__ == "__main__":
    main()
