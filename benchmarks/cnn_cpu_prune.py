"""Stage "prune" of protocol "cifar-cpu" (BENCHMARKS.md): class-aware filter pruning of the trained ResNet-20 baselines
against L1-norm and plain Taylor filter pruning, at equal MACs and equal retraining epochs, seeds 2023 and 2024.

Each seed starts from its baseline checkpoint `results/cnn_cpu/resnet20-seed<seed>` (stage "baseline").

1. Class-aware pruning, the loop of Jiang et al. (DATE 2024) from the pieces of `hf_compress.class_aware`: per-class
   Taylor importance of every inner conv filter on the first 32 train images of each class, removal of the filters
   important for at most one class (at most 20% of the filters per iteration), physical shrinking, retraining with
   the L1 class-specificity regulariser. As in the paper, the iterations go on until no filter can be removed, here
   within a budget of 5 iterations of 8 epochs; a validation accuracy below the floor (the baseline's minus 1 point)
   does not stop them (`class_aware.loop` stops there; the paper does not). The result is the smallest iteration
   that meets the floor (`record.best_row`).
2. L1-norm pruning (uniform ratio, Li et al. 2017; `shrink.l1_prune_to_macs`) and plain Taylor pruning (the same
   |a * dL/da| on the same images, averaged over all of them with no per-class counting, L2-normalised per layer and
   ranked across layers, Molchanov et al. 2017; `shrink.taylor_prune_to_macs`) of the same baseline to the
   class-aware result's MACs (the closest count at or above), then one retraining of as many epochs as the
   class-aware result received, with plain cross-entropy.
3. Beyond the floor (`--compare-at`, default the target's 45%): when the result is an earlier iteration, the same two
   baselines are also pruned to the MACs of the first class-aware iteration that removes at least that share and
   retrained for the epochs behind it, so that the criteria are compared where pruning costs accuracy (the `points`
   of the results). This runs after every seed's result.

Retraining, every method: SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 128, lr 0.01 decayed to zero by a
cosine in every run (each class-aware iteration, each one-shot baseline), the protocol's augmentation, channels_last,
float32 (bfloat16 autocast where the CPU multiplies bfloat16 natively). Budget: class-aware pruning spends 40
retraining epochs per seed (5 x 8), the baselines as many as lie behind the chosen class-aware iteration (8 per
iteration, at most 40). At about 2 minutes per epoch of 45,000 images at full width on 2 cores, less once pruned, that
is 1 to 1.5 hours per method and seed, 5 to 7 hours for the stage. Final test accuracies go through the stock
`pipeline("image-classification")` and `evaluate` with 95% bootstrap intervals (`hf_compress.evaluation.accuracy`;
scipy's BCa interval holds about 6 GB for a moment on 10,000 images); the per-iteration curve uses `evaluate_accuracy`
(the same numbers up to the pipeline's float32 preprocessing).

Resumable: every pruned network, its training state (after every epoch) and every finished iteration is kept under
`--work-dir/prune-resnet20-seed<seed>/<method>/` (default `benchmarks/work/cnn_cpu/`), so the stage may be stopped at
any time and run again. A finished step keeps only what resuming and the results read: its row in `state.json` and
the retrained networks of the last and of the best iteration (about 1 MB each); its training state and the network
saved before retraining are removed, so that the work folder stays small enough to carry to another machine with
the repository.

    python benchmarks/bench_cnn_cpu.py prune --seed 2023 --seed 2024

Writes, after each seed (merged with the rows stored before), `results/cnn_cpu_prune.json` (one row per method and
seed, with its accuracy-vs-MACs curve; `points`: the comparison beyond the floor), `.md`,
`results/cnn_cpu_prune_curve.png`, the final checkpoints `results/cnn_cpu/resnet20-seed<seed>-<method>/`, and the
`<method>_macs_reduction`, `<method>_params_reduction`, `<method>_test_acc` entries (mean and per seed) of
`results/cnn_cpu_summary.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common / bench_cnn_cpu when imported from elsewhere

from bench_common import RESULTS, add_cifar_cpu_arguments, device_note, mean, seed_summary  # noqa: E402

from hf_compress import __version__  # noqa: E402
from hf_compress.checkpoint import atomic_write_json, atomic_write_text  # noqa: E402
from hf_compress.class_aware.config import ClassAwareConfig, ImageDataConfig  # noqa: E402
from hf_compress.class_aware.data import data_refs  # noqa: E402
from hf_compress.class_aware.importance import class_importance, select_filters, taylor_importance  # noqa: E402
from hf_compress.class_aware.record import best_row, compression_record  # noqa: E402
from hf_compress.class_aware.regularizers import regularized_loss  # noqa: E402
from hf_compress.class_aware.shrink import l1_prune_to_macs, shrink, taylor_prune_to_macs  # noqa: E402
from hf_compress.data.images import ImageClassificationData, load_image_dataset, train_val_split  # noqa: E402
from hf_compress.device import native_bfloat16  # noqa: E402
from hf_compress.errors import HFCompressError  # noqa: E402
from hf_compress.modeling.pruned_cnn import PrunedCNNForImageClassification  # noqa: E402
from hf_compress.provenance import SourceRef  # noqa: E402
from hf_compress.vision.checkpoint import save_checkpoint  # noqa: E402
from hf_compress.vision.training import evaluate_accuracy, train_classifier  # noqa: E402

METHODS = ("class_aware", "l1", "taylor")
LABELS = {"class_aware": "class-aware", "l1": "L1-norm", "taylor": "plain Taylor"}
STEM = "cnn_cpu_prune"
# What the stage must show (the protocol's target for this comparison).
TARGET = {"macs_reduction": 0.45, "max_accuracy_drop": 0.01}


def _protocol() -> dict[str, Any]:
    # Imported on use: bench_cnn_cpu imports this module to dispatch to it.
    from bench_cnn_cpu import PROTOCOL

    return PROTOCOL


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of stage "prune" (their defaults are the protocol's budget)."""
    group = add_cifar_cpu_arguments(parser, "stage prune",
                                    "pruned networks, training states and finished iterations, for resuming")
    group.add_argument("--method", action="append", choices=METHODS,
                       help="repeatable (default all; L1 and Taylor need the class-aware result of their seed)")
    group.add_argument("--iterations", type=int, default=5, help="class-aware iterations at most")
    group.add_argument("--retrain-epochs", type=int, default=8, help="retraining epochs per class-aware iteration")
    group.add_argument("--retrain-lr", type=float, default=0.01, help="peak lr of every retraining (cosine to zero)")
    group.add_argument("--max-fraction", type=float, default=0.2, help="most filters removed per iteration")
    group.add_argument("--max-classes", type=int, default=1, help="filters important for at most this many classes go")
    group.add_argument("--images-per-class", type=int, default=32,
                       help="train images per class scored (both Taylor criteria)")
    group.add_argument("--used-threshold", type=float, default=1.0)
    group.add_argument("--class-threshold", type=float, default=0.5)
    group.add_argument("--regularizer", default="l1", choices=["none", "orthogonal", "l1"],
                       help="class-aware retraining regulariser")
    group.add_argument("--floor-drop", type=float, default=0.01,
                       help="accuracy floor = baseline validation accuracy minus this")
    group.add_argument("--target-macs-reduction", type=float, default=None,
                       help="also stop class-aware pruning once the MACs are reduced by this fraction")
    group.add_argument("--compare-at", type=float, default=TARGET["macs_reduction"], metavar="FRACTION",
                       help="also compare the three methods at the first class-aware iteration removing at least "
                            "this fraction of the MACs, when it is not the result (default: the target, 0.45; 0: off)")
    group.add_argument("--bootstrap-resamples", type=int, default=9999, help="of the 95%% test accuracy intervals")


# --------------------------------------------------------------------------------------------------- run context
@dataclass
class _Run:
    """What every step of the stage reads: the options, the splits, the precision and the folders."""

    args: argparse.Namespace
    train: ImageClassificationData
    val: ImageClassificationData
    test: ImageClassificationData
    bf16: bool
    results: Path
    baselines: Path

    @property
    def protocol(self) -> dict[str, Any]:
        return _protocol()

    @property
    def reduced(self) -> bool:
        return any(v is not None for v in (self.args.train_limit, self.args.val_size, self.args.test_limit))

    @property
    def precision(self) -> str:
        """What this machine retrains and evaluates in; each step records it, since a stage resumed on another
        machine may run its later steps in another precision."""
        return "bfloat16" if self.bf16 else "float32"

    def scale(self) -> dict[str, Any]:
        return {"train_images": len(self.train), "val_images": len(self.val), "test_images": len(self.test)}

    def measured(self) -> dict[str, Any]:
        """The machine and the note of this invocation, recorded in the states it starts."""
        return {"device": device_note(), "note": self.args.note}

    def stored_report(self) -> dict[str, Any]:
        """The results file as the last run wrote it ({} before the first)."""
        path = self.results / f"{STEM}.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def stored_rows(self) -> list[dict[str, Any]]:
        return self.stored_report().get("rows", [])

    def seed_dir(self, seed: int) -> Path:
        return Path(self.args.work_dir).expanduser() / f"prune-resnet20-seed{seed}"

    def baseline_path(self, seed: int) -> Path:
        return self.baselines / f"resnet20-seed{seed}"

    def load_baseline(self, seed: int) -> PrunedCNNForImageClassification:
        path = self.baseline_path(seed)
        if not (path / "config.json").is_file():
            raise HFCompressError(f"no baseline checkpoint at {path}: run stage 'baseline' for seed {seed} first")
        return PrunedCNNForImageClassification.from_pretrained(path).eval()

    def evaluate(self, model) -> tuple[float, float]:
        """(validation, test) accuracy by `evaluate_accuracy` (the per-iteration curve and the floor)."""
        return self.val_accuracy(model), evaluate_accuracy(model, self.test, bf16=self.bf16)

    def val_accuracy(self, model) -> float:
        return evaluate_accuracy(model, self.val, bf16=self.bf16)

    def retrain(self, model, epochs: int, *, seed: int, folder: Path, loss_fn=None, desc: str) -> float:
        """Retrains `model` in place with the stage's settings, resuming per epoch from `folder`; returns the wall
        seconds of this call (only the epochs it trained)."""
        p = self.protocol
        start = time.time()
        if epochs > 0:
            train_classifier(
                model, self.train, epochs=epochs, lr=self.args.retrain_lr, batch_size=p["batch_size"],
                momentum=p["momentum"], nesterov=p["nesterov"], weight_decay=p["weight_decay"], schedule="cosine",
                warmup_epochs=0, loss_fn=loss_fn, bf16=self.bf16, channels_last=p["channels_last"], seed=seed,
                resume_dir=folder, desc=desc,
            )
        model.eval()
        return time.time() - start

    def display_path(self, path: Path) -> str:
        """`path` as the results name it: relative to the folder above the results (`results/cnn_cpu/...`)."""
        path, top = path.resolve(), self.results.resolve().parent
        return str(path.relative_to(top)) if path.is_relative_to(top) else str(path)

    def save(self, model, path: Path, extra_json: dict | None = None) -> None:
        save_checkpoint(model, path, mean=self.train.mean, std=self.train.std, extra_json=extra_json)


def _load_splits(args) -> tuple[ImageClassificationData, ImageClassificationData, ImageClassificationData]:
    """The protocol's splits: 45,000 train / 5,000 validation (seed 2023) / 10,000 test (limits at reduced scale)."""
    p = _protocol()
    train_all = load_image_dataset("cifar10", "train", limit=args.train_limit, seed=p["split_seed"])
    train, val = train_val_split(train_all, n_val=args.val_size or p["val_images"], seed=p["split_seed"])
    test = load_image_dataset("cifar10", "test", limit=args.test_limit, seed=p["split_seed"])
    return train, val, test


class _State:
    """`state.json` of one method and seed: the settings it ran with, where and with which note its work started
    (`measured`: what its result row says, however often the stage is run again), and what it finished (replaced
    atomically)."""

    def __init__(self, folder: Path, settings: dict[str, Any], measured: dict[str, Any]):
        self.folder, self.settings = folder, settings
        path = folder / "state.json"
        self.content: dict[str, Any] = (json.loads(path.read_text()) if path.is_file() else
                                        {"settings": settings, "measured": measured})
        if self.content["settings"] != settings:
            raise HFCompressError(
                f"{folder} holds a run with other settings ({self.content['settings']}); rerun with those settings "
                f"or pass another --work-dir (these: {settings})"
            )

    def get(self, key: str, default=None):
        return self.content.get(key, default)

    def update(self, **entries) -> None:
        self.content.update(entries)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.folder / "state.json", self.content)


def _model_row(run: _Run, model, **entries) -> dict[str, Any]:
    return {"params": int(model.config.num_parameters), "macs": int(model.config.num_macs),
            "precision": run.precision, **entries}


def _precisions(*rows: dict[str, Any]) -> str:
    """The precisions the steps behind a result ran in ("bfloat16", or "bfloat16, float32" when they differ)."""
    return ", ".join(sorted({row.get("precision", "unrecorded") for row in rows}))


# --------------------------------------------------------------------------------------------------- baseline
def _baseline(run: _Run, seed: int) -> _State:
    """The state of the seed's baseline: its params, MACs, validation and test accuracy under `row`."""
    # Named as the results name it, not by its absolute path: the work folder moves with the repository.
    settings = {"checkpoint": run.display_path(run.baseline_path(seed)), **run.scale()}
    state = _State(run.seed_dir(seed) / "baseline", settings, run.measured())
    if state.get("row") is None:
        model = run.load_baseline(seed)
        val, test = run.evaluate(model)
        state.update(row=_model_row(run, model, val_acc=val, test_acc=test))
    return state


# --------------------------------------------------------------------------------------------------- class-aware
def _class_aware_config(run: _Run, seed: int, base: dict[str, Any]) -> ClassAwareConfig:
    a = run.args
    return ClassAwareConfig(
        accuracy_floor=max(0.0, base["val_acc"] - a.floor_drop), max_classes=a.max_classes,
        images_per_class=a.images_per_class, used_threshold=a.used_threshold, class_threshold=a.class_threshold,
        max_fraction=a.max_fraction, max_iterations=a.iterations, target_macs_reduction=a.target_macs_reduction,
        retrain_epochs=a.retrain_epochs, lr=a.retrain_lr, batch_size=run.protocol["batch_size"],
        weight_decay=run.protocol["weight_decay"], regularizer=a.regularizer, val_size=len(run.val), seed=seed,
    )


def _class_aware_iteration(run: _Run, config: ClassAwareConfig, model, iteration: int, folder: Path, loss_fn):
    """One iteration of the loop (score, select, shrink, retrain, evaluate), resumable inside: the pruned network is
    saved before retraining and the retraining resumes per epoch. Returns `(model, row)`, or None when no filter
    can be removed."""
    pruned_dir = folder / "pruned"
    if (pruned_dir / "config.json").is_file():
        pruned = PrunedCNNForImageClassification.from_pretrained(pruned_dir)
        selection = json.loads((pruned_dir / "selection.json").read_text())
    else:
        importance = class_importance(model, run.train, images_per_class=config.images_per_class,
                                      used_threshold=config.used_threshold, class_threshold=config.class_threshold)
        keep, removed = select_filters(model, importance, max_classes=config.max_classes,
                                       max_fraction=config.max_fraction)
        if removed == 0:
            return None
        pruned = shrink(model, keep).eval()
        selection = {"filters_removed": removed, "val_acc_before_retraining": run.val_accuracy(pruned),
                     "kept": {name: index.tolist() for name, index in keep.items()}}
        run.save(pruned, pruned_dir, extra_json={"selection.json": selection})
    # The loop seeds iteration i's retraining with seed + i.
    seconds = run.retrain(pruned, config.retrain_epochs, seed=config.seed + iteration, folder=folder / "train",
                          loss_fn=loss_fn, desc=f"class-aware iteration {iteration}")
    val, test = run.evaluate(pruned)
    run.save(pruned, folder / "model")
    row = _model_row(run, pruned, iteration=iteration, filters_removed=selection["filters_removed"], val_accuracy=val,
                     test_accuracy=test, meets_floor=val >= config.accuracy_floor,
                     val_acc_before_retraining=selection["val_acc_before_retraining"], seconds=seconds)
    print(f"class-aware iteration {iteration}: {selection['filters_removed']} filters removed, MACs "
          f"{row['macs'] / 1e6:.2f}M, val {100 * val:.2f}%, test {100 * test:.2f}%", flush=True)
    return pruned, row


def _budget_spent(config: ClassAwareConfig, rows: list[dict[str, Any]]) -> str | None:
    """Why the loop stops before the next iteration (other than no removable filter), or None: the iteration budget
    or the optional MAC target. Unlike `class_aware.loop`, not a validation accuracy below the floor."""
    if rows[-1]["iteration"] >= config.max_iterations:
        return f"reached {config.max_iterations} iterations"
    target = config.mac_target(rows[0]["macs"])
    if target is not None and rows[-1]["macs"] <= target:
        return f"reached the MAC target {target}"
    return None


def _class_aware(run: _Run, seed: int, config: ClassAwareConfig, base: dict[str, Any]) -> _State:
    """Runs (or resumes, or reads) the class-aware loop of `seed`; returns its state (`rows`, `stop_reason`,
    `best_iteration`)."""
    folder = run.seed_dir(seed) / "class_aware"
    state = _State(folder, {"config": config.to_dict(), **run.scale()}, run.measured())
    if state.get("stop_reason") is not None:
        return state
    rows = state.get("rows") or [{"iteration": 0, "params": base["params"], "macs": base["macs"], "filters_removed": 0,
                                  "val_accuracy": base["val_acc"], "test_accuracy": base["test_acc"],
                                  "meets_floor": True}]
    state.update(rows=rows)
    last = rows[-1]["iteration"]
    model = (run.load_baseline(seed) if last == 0 else
             PrunedCNNForImageClassification.from_pretrained(folder / f"iter_{last:03d}" / "model").eval())
    loss_fn = regularized_loss(config.regularizer, config.regularizer_weight)
    while (stop_reason := _budget_spent(config, rows)) is None:
        iteration = rows[-1]["iteration"] + 1
        outcome = _class_aware_iteration(run, config, model, iteration, folder / f"iter_{iteration:03d}", loss_fn)
        if outcome is None:
            stop_reason = "no filter can be removed"
            break
        # The paper prunes on from the retrained network whatever its accuracy; the floor only picks the result.
        model, row = outcome
        rows.append(row)
        state.update(rows=rows)
        _tidy_class_aware(folder, rows)
    best = best_row(rows)
    state.update(rows=rows, stop_reason=stop_reason, best_iteration=best["iteration"])
    return state


def _tidy_class_aware(folder: Path, rows: list[dict[str, Any]]) -> None:
    """Removes what no later step reads from the finished iterations in `folder`: every training state and network
    saved before retraining, and the retrained networks of iterations that are neither the last (the next iteration
    starts from it) nor the best so far (the stage's result)."""
    keep = {rows[-1]["iteration"], best_row(rows)["iteration"]}
    for row in rows[1:]:
        step = folder / f"iter_{row['iteration']:03d}"
        for name in ("train", "pruned") if row["iteration"] in keep else ("train", "pruned", "model"):
            shutil.rmtree(step / name, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- one-shot
def _one_shot(run: _Run, seed: int, method: str, target_macs: int, epochs: int, name: str | None = None) -> _State:
    """L1-norm or plain Taylor pruning of the baseline to `target_macs`, retrained `epochs` epochs (resumable, in the
    seed's folder `name`, by default the method's)."""
    folder = run.seed_dir(seed) / (name or method)
    settings = {"target_macs": target_macs, "epochs": epochs, "lr": run.args.retrain_lr, **run.scale()}
    if method == "taylor":
        settings["images_per_class"] = run.args.images_per_class
    state = _State(folder, settings, run.measured())
    if state.get("row") is not None:
        return state
    pruned_dir = folder / "pruned"
    if (pruned_dir / "config.json").is_file():
        pruned = PrunedCNNForImageClassification.from_pretrained(pruned_dir)
        selection = json.loads((pruned_dir / "selection.json").read_text())
    else:
        base = run.load_baseline(seed)
        if method == "l1":
            pruned = l1_prune_to_macs(base, target_macs)
        else:
            importance = taylor_importance(base, run.train, images_per_class=run.args.images_per_class)
            pruned = taylor_prune_to_macs(base, importance, target_macs)
        pruned.eval()
        selection = {"val_acc_before_retraining": run.val_accuracy(pruned)}
        run.save(pruned, pruned_dir, extra_json={"selection.json": selection})
    seconds = run.retrain(pruned, epochs, seed=seed, folder=folder / "train", desc=f"{LABELS[method]} retraining")
    val, test = run.evaluate(pruned)
    run.save(pruned, folder / "model")
    row = _model_row(run, pruned, val_accuracy=val, test_accuracy=test,
                     val_acc_before_retraining=selection["val_acc_before_retraining"], seconds=seconds)
    print(f"{LABELS[method]}: MACs {row['macs'] / 1e6:.2f}M (target {target_macs / 1e6:.2f}M), val {100 * val:.2f}%, "
          f"test {100 * test:.2f}%", flush=True)
    state.update(row=row)
    # The retrained network is the result; the state and the network before retraining only served resuming.
    for name in ("train", "pruned"):
        shutil.rmtree(folder / name, ignore_errors=True)
    return state


# --------------------------------------------------------------------------------------------------- final models
def _final_checkpoint(run: _Run, seed: int, method: str, source: Path, stamp=None) -> Path:
    """Copies a method's final network to `results/cnn_cpu/resnet20-seed<seed>-<method>` (with the class-aware
    provenance record when `stamp` gives one)."""
    model = PrunedCNNForImageClassification.from_pretrained(source)
    if stamp is not None:
        model.config.compression = stamp
    path = run.results / "cnn_cpu" / f"resnet20-seed{seed}-{method.replace('_', '-')}"
    run.save(model, path)
    return path


def _pipeline_accuracy(run: _Run, state: _State, checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's test accuracy through the stock pipeline and evaluate, with its bootstrap interval (cached
    in `state` per checkpoint and resample count)."""
    from hf_compress.evaluation.accuracy import pipeline_accuracy

    key = {"checkpoint": checkpoint.name, "n_resamples": run.args.bootstrap_resamples, "test_images": len(run.test)}
    cached = state.get("pipeline")
    if cached is not None and cached.get("key") == key:
        return cached["result"]
    result = pipeline_accuracy(checkpoint, run.test, n_resamples=run.args.bootstrap_resamples, random_state=0,
                               device=-1).to_dict()
    state.update(pipeline={"key": key, "result": result})
    return result


def _reductions(row: dict[str, Any], base: dict[str, Any], compared_macs: int) -> dict[str, float]:
    """What a pruned network removed from its baseline, and its MACs against the class-aware network it is
    compared with (the one-shot baselines land at or just above them)."""
    return {"params_reduction": 1 - row["params"] / base["params"], "macs_reduction": 1 - row["macs"] / base["macs"],
            "macs_vs_class_aware": row["macs"] / compared_macs}


def _measured(run: _Run, state: _State, seed: int, method: str) -> dict[str, Any]:
    """The machine and note of a result row: those its state recorded when the work started. A state from before they
    were recorded keeps those of its stored row (this invocation's where there is none), so that running the stage
    again, for another seed or to read the results, never rewrites what an earlier row says of its measurement."""
    if state.get("measured") is not None:
        return state.get("measured")
    stored = next((r for r in run.stored_rows() if r.get("seed") == seed and r.get("method") == method), None)
    return {"device": stored.get("device"), "note": stored.get("note")} if stored else run.measured()


def _seed_rows(run: _Run, seed: int, methods: list[str]) -> list[dict[str, Any]]:
    """Runs what is missing for `seed` and returns its rows (the baseline first)."""
    base_state = _baseline(run, seed)
    base = base_state.get("row")
    base_ci = _pipeline_accuracy(run, base_state, run.baseline_path(seed))
    common = {"seed": seed, "hf_compress_version": __version__}
    rows = [{"method": "baseline", **common, **_measured(run, base_state, seed, "baseline"),
             "precision": _precisions(base), "params": base["params"],
             "macs": base["macs"],
             "test_acc": base_ci["accuracy"], "test_acc_ci": [base_ci["ci_low"], base_ci["ci_high"]],
             "test_acc_se": base_ci["standard_error"], "test_acc_direct": base["test_acc"], "val_acc": base["val_acc"],
             "checkpoint": run.display_path(run.baseline_path(seed))}]

    config = _class_aware_config(run, seed, base)
    ca_state = _class_aware(run, seed, config, base)
    ca_rows = ca_state.get("rows")
    best = next(r for r in ca_rows if r["iteration"] == ca_state.get("best_iteration"))
    # Equal budgets: the baselines get the epochs that produced the class-aware result (the epochs of iterations after
    # it are spent too, but nothing they produced is reported).
    epochs = best["iteration"] * config.retrain_epochs
    finals: dict[str, dict[str, Any]] = {}
    if "class_aware" in methods:
        source = (run.baseline_path(seed) if best["iteration"] == 0 else
                  run.seed_dir(seed) / "class_aware" / f"iter_{best['iteration']:03d}" / "model")
        record = compression_record(config, ca_rows, ca_state.get("stop_reason"),
                                    SourceRef.of(str(run.baseline_path(seed))),
                                    data_refs(ImageDataConfig(dataset="cifar10"), with_eval=True))
        checkpoint = _final_checkpoint(run, seed, "class_aware", source, stamp=record)
        finals["class_aware"] = {
            "state": ca_state, "checkpoint": checkpoint, "row": best, "epochs": epochs,
            "precision": _precisions(*(ca_rows[1: best["iteration"] + 1] or [base])),
            "extra": {"epochs_spent": (len(ca_rows) - 1) * config.retrain_epochs, "best_iteration": best["iteration"],
                      "stop_reason": ca_state.get("stop_reason"), "accuracy_floor": config.accuracy_floor,
                      "seconds": sum(r.get("seconds", 0.0) for r in ca_rows)},
            "curve": [{"iteration": r["iteration"], "params": r["params"], "macs": r["macs"],
                       "val_acc": r["val_accuracy"], "test_acc": r["test_accuracy"], "meets_floor": r["meets_floor"],
                       "filters_removed": r["filters_removed"],
                       "val_acc_before_retraining": r.get("val_acc_before_retraining")} for r in ca_rows],
        }
    for method in ("l1", "taylor"):
        if method not in methods:
            continue
        state = _one_shot(run, seed, method, best["macs"], epochs)
        row = state.get("row")
        checkpoint = _final_checkpoint(run, seed, method, run.seed_dir(seed) / method / "model")
        finals[method] = {
            "state": state, "checkpoint": checkpoint, "row": row, "epochs": epochs, "precision": _precisions(row),
            "extra": {"target_macs": best["macs"], "val_acc_before_retraining": row["val_acc_before_retraining"],
                      "seconds": row["seconds"]},
            "curve": [{"step": "baseline", "params": base["params"], "macs": base["macs"], "val_acc": base["val_acc"],
                       "test_acc": base["test_acc"]},
                      {"step": "pruned and retrained", "params": row["params"], "macs": row["macs"],
                       "val_acc": row["val_accuracy"], "test_acc": row["test_accuracy"]}],
        }
    for method, final in finals.items():
        ci = _pipeline_accuracy(run, final["state"], final["checkpoint"])
        row = final["row"]
        rows.append({
            "method": method, **common, **_measured(run, final["state"], seed, method),
            "precision": final["precision"], "params": row["params"], "macs": row["macs"],
            "test_acc": ci["accuracy"], "test_acc_ci": [ci["ci_low"], ci["ci_high"]],
            "test_acc_se": ci["standard_error"],
            "test_acc_direct": row["test_accuracy"], "val_acc": row["val_accuracy"],
            **_reductions(row, base, best["macs"]),
            "test_acc_change": ci["accuracy"] - base_ci["accuracy"], "retrain_epochs": final["epochs"],
            **final["extra"], "curve": final["curve"],
            "checkpoint": run.display_path(final["checkpoint"]),
        })
    return rows


def _point_rows(run: _Run, seed: int, methods: list[str]) -> list[dict[str, Any]]:
    """The comparison beyond the floor: at the first class-aware iteration that removes at least `--compare-at` of
    the MACs, when it is not the result, the L1-norm and plain Taylor baselines pruned to its MACs and retrained for
    the epochs behind it. Accuracies by `evaluate_accuracy` for all three (the class-aware iteration's network is not
    kept as a checkpoint); empty when no iteration qualifies or the result itself does."""
    if run.args.compare_at <= 0:
        return []
    base = _baseline(run, seed).get("row")
    config = _class_aware_config(run, seed, base)
    ca_state = _class_aware(run, seed, config, base)
    point = next((r for r in ca_state.get("rows") if 1 - r["macs"] / base["macs"] >= run.args.compare_at), None)
    if point is None or point["iteration"] == ca_state.get("best_iteration"):
        return []
    epochs = point["iteration"] * config.retrain_epochs
    label = f"iteration {point['iteration']}"

    def row(method: str, r: dict[str, Any]) -> dict[str, Any]:
        return {"method": method, "seed": seed, "point": label, "params": r["params"], "macs": r["macs"],
                **_reductions(r, base, point["macs"]), "val_acc": r["val_accuracy"], "test_acc_direct": r["test_accuracy"],
                "test_acc_change_direct": r["test_accuracy"] - base["test_acc"], "retrain_epochs": epochs,
                "precision": _precisions(r)}

    rows = [row("class_aware", point)]
    for method in ("l1", "taylor"):
        if method in methods:
            state = _one_shot(run, seed, method, point["macs"], epochs, name=f"{method}-iter{point['iteration']:03d}")
            rows.append(row(method, state.get("row")))
    return rows


# --------------------------------------------------------------------------------------------------- outputs
def _summary_entries(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`<method>_<figure>` (mean over seeds) and `<method>_<figure>_per_seed` for the summary file."""
    entries: dict[str, Any] = {}
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if mine:
            entries.update(seed_summary(mine, method, ("macs_reduction", "params_reduction", "test_acc")))
    return entries


def _pct(value: float, digits: int = 2) -> str:
    return f"{100 * value:.{digits}f}%"


def _markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    budget = report["budget"]
    lines = [
        "# Class-aware vs L1-norm vs plain Taylor filter pruning, ResNet-20, protocol \"cifar-cpu\"", "",
        f"Scale: {report['scale']['train_images']} train / {report['scale']['val_images']} validation / "
        f"{report['scale']['test_images']} test images{' (REDUCED)' if report['reduced'] else ''}. "
        f"Budget: class-aware up to {budget['iterations']} iterations x {budget['retrain_epochs_per_iteration']} "
        f"epochs; L1-norm and plain Taylor pruned once to the class-aware MACs (closest count at or above) and "
        f"retrained for the epochs behind the class-aware result; lr {budget['retrain_lr']} cosine to zero per run. "
        f"Test accuracy through `pipeline(\"image-classification\")` + `evaluate`, 95% bootstrap interval.", "",
        "| method | seed | params | MACs | params removed | MACs removed | test acc [95% CI] | vs baseline | "
        "retrain epochs | MACs / class-aware | retrained in |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["seed"], ["baseline", *METHODS].index(r["method"]))):
        if r["method"] == "baseline":
            pruned = ["-"] * 6
        else:
            pruned = [_pct(r["params_reduction"], 1), _pct(r["macs_reduction"], 1),
                      f"{100 * r['test_acc_change']:+.2f}", str(r["retrain_epochs"]), f"{r['macs_vs_class_aware']:.3f}",
                      r.get("precision", "-")]
        accuracy = f"{_pct(r['test_acc'])} [{_pct(r['test_acc_ci'][0])}, {_pct(r['test_acc_ci'][1])}]"
        cells = [LABELS.get(r["method"], r["method"]), str(r["seed"]), f"{r['params'] / 1e6:.3f}M",
                 f"{r['macs'] / 1e6:.2f}M", *pruned[:2], accuracy, *pruned[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean over seeds:", "", "| method | seeds | MACs removed | params removed | test acc | vs baseline |",
              "|---|---|---:|---:|---:|---:|"]
    means = {}
    for method in ["baseline", *METHODS]:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        acc = mean([r["test_acc"] for r in mine])
        # The standard error of the mean over seeds, from each checkpoint's bootstrap standard error.
        se = sum(r["test_acc_se"] ** 2 for r in mine) ** 0.5 / len(mine)
        means[method] = {"acc": acc, "se": se, "seeds": sorted(r["seed"] for r in mine)}
        if method == "baseline":
            lines.append(f"| baseline | {', '.join(map(str, means[method]['seeds']))} | - | - | {_pct(acc)} | - |")
            continue
        means[method].update(macs=mean([r["macs_reduction"] for r in mine]),
                             change=mean([r["test_acc_change"] for r in mine]))
        lines.append(f"| {LABELS[method]} | {', '.join(map(str, means[method]['seeds']))} | "
                     f"{_pct(means[method]['macs'], 1)} | {_pct(mean([r['params_reduction'] for r in mine]), 1)} | "
                     f"{_pct(acc)} | {100 * means[method]['change']:+.2f} |")
    lines.append("")
    ca = means.get("class_aware")
    if ca:
        met = ca["macs"] >= TARGET["macs_reduction"] and ca["change"] >= -TARGET["max_accuracy_drop"]
        lines.append(f"Target (>= {_pct(TARGET['macs_reduction'], 0)} fewer MACs within "
                     f"{100 * TARGET['max_accuracy_drop']:.1f} point of the baseline, mean of the seeds): "
                     f"{'met' if met else 'not met'} ({_pct(ca['macs'], 1)} fewer MACs, "
                     f"{100 * ca['change']:+.2f} points).")
        for method in ("l1", "taylor"):
            if method in means and means[method]["seeds"] == ca["seeds"]:
                ahead = ca["acc"] - means[method]["acc"]
                lines.append(f"Class-aware vs {LABELS[method]} at equal MACs: {100 * ahead:+.2f} points "
                             f"({_verdict(ahead, ca['se'], means[method]['se'])}).")
        lines.append("")
    for r in rows:
        if r["method"] != "class_aware":
            continue
        lines += [f"Class-aware iterations, seed {r['seed']} (floor {_pct(r['accuracy_floor'])} validation; "
                  f"stop: {r['stop_reason']}; result: iteration {r['best_iteration']}):", "",
                  "| iteration | params | MACs | filters removed | val acc before retraining | val acc | test acc | "
                  "meets floor |", "|---:|---:|---:|---:|---:|---:|---:|:---:|"]
        for c in r["curve"]:
            before = c.get("val_acc_before_retraining")
            cells = [str(c["iteration"]), f"{c['params'] / 1e6:.3f}M", f"{c['macs'] / 1e6:.2f}M",
                     str(c["filters_removed"]),
                     _pct(before) if before is not None else "-", _pct(c["val_acc"]), _pct(c["test_acc"]),
                     "yes" if c["meets_floor"] else "no"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += _points_markdown(report.get("points", []), report.get("compare_at"))
    lines.append("![accuracy vs MACs](cnn_cpu_prune_curve.png)")
    return "\n".join(lines) + "\n"


def _verdict(difference: float, se_a: float, se_b: float) -> str:
    """Whether an accuracy difference is larger than the noise: against the 95% half-width of the difference of two
    independent estimates (conservative here: both are measured on the same test images, whose errors correlate)."""
    half_width = 1.96 * (se_a ** 2 + se_b ** 2) ** 0.5
    if abs(difference) <= half_width:
        return f"within the noise, +-{100 * half_width:.2f} points"
    return f"{'ahead' if difference > 0 else 'behind'}, beyond the noise of +-{100 * half_width:.2f} points"


def _points_markdown(points: list[dict[str, Any]], compare_at: float | None) -> list[str]:
    """The comparison beyond the floor, per seed and as the mean over the seeds that have all methods."""
    if not points:
        return []
    lines = [f"Beyond the floor: the three methods at the first class-aware iteration removing at least "
             f"{_pct(compare_at or 0, 0)} of the MACs (the L1-norm and plain Taylor baselines pruned once to its MACs "
             "and retrained for the epochs behind it; accuracies by `evaluate_accuracy`, no interval):", "",
             "| seed | point | method | MACs removed | params removed | val acc | test acc | vs baseline | retrain epochs "
             "| retrained in |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    order = ["class_aware", "l1", "taylor"]
    for r in sorted(points, key=lambda r: (r["seed"], order.index(r["method"]))):
        lines.append(f"| {r['seed']} | {r['point']} | {LABELS[r['method']]} | {_pct(r['macs_reduction'], 1)} | "
                     f"{_pct(r['params_reduction'], 1)} | {_pct(r['val_acc'])} | {_pct(r['test_acc_direct'])} | "
                     f"{100 * r['test_acc_change_direct']:+.2f} | {r['retrain_epochs']} | {r['precision']} |")
    complete = sorted(seed for seed in {r["seed"] for r in points}
                      if {r["method"] for r in points if r["seed"] == seed} == set(order))
    if complete:
        acc = {m: mean([r["test_acc_direct"] for r in points if r["method"] == m and r["seed"] in complete])
               for m in order}
        lines += ["", f"Mean over seeds {', '.join(map(str, complete))}: class-aware {_pct(acc['class_aware'])}, "
                  f"L1-norm {_pct(acc['l1'])} ({100 * (acc['class_aware'] - acc['l1']):+.2f} points for class-aware), "
                  f"plain Taylor {_pct(acc['taylor'])} ({100 * (acc['class_aware'] - acc['taylor']):+.2f})."]
    return lines + [""]


def _plot(rows: list[dict[str, Any]], path: Path, points: list[dict[str, Any]] = ()) -> None:
    """Test accuracy vs MACs: one line per method and seed (class-aware: every iteration; the one-shot baselines:
    from the baseline to their retrained result), and the one-shot baselines at the point beyond the floor (crosses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"class_aware": "tab:red", "l1": "tab:blue", "taylor": "tab:green"}
    markers = ["o", "s", "^", "D"]
    seeds = sorted({r["seed"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bases = [r["test_acc"] for r in rows if r["method"] == "baseline"]
    if bases:
        ax.axhline(100 * (mean(bases) - TARGET["max_accuracy_drop"]), color="gray", linestyle=":",
                   label="baseline (mean) - 1 point")
    for r in rows:
        if r["method"] == "baseline":
            continue
        curve = r["curve"]
        style = "-" if r["method"] == "class_aware" else "--"
        ax.plot([c["macs"] / 1e6 for c in curve], [100 * c["test_acc"] for c in curve], style,
                marker=markers[seeds.index(r["seed"]) % len(markers)], color=colors[r["method"]],
                label=f"{LABELS[r['method']]}, seed {r['seed']}")
        if r["method"] == "class_aware":  # the iteration kept as the result (the others are only on the curve)
            kept = next(c for c in curve if c["iteration"] == r["best_iteration"])
            ax.plot([kept["macs"] / 1e6], [100 * kept["test_acc"]], "*", markersize=14, color=colors[r["method"]])
    for r in points:
        if r["method"] != "class_aware":  # the class-aware point is on its curve already
            ax.plot([r["macs"] / 1e6], [100 * r["test_acc_direct"]], "x", markersize=9, color=colors[r["method"]])
    ax.set_xlabel("MACs (millions, batch 1)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("ResNet-20, CIFAR-10: accuracy vs MACs over the pruning iterations")
    ax.invert_xaxis()  # pruning goes right to left
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _merged(previous: list[dict[str, Any]], new: list[dict[str, Any]], *fields: str) -> list[dict[str, Any]]:
    """`previous` without the rows `new` replaces (same values of `fields`), then `new`."""
    keys = {tuple(r[f] for f in fields) for r in new}
    return [r for r in previous if tuple(r[f] for f in fields) not in keys] + new


def _write_outputs(run: _Run, rows: list[dict[str, Any]], points: list[dict[str, Any]] = ()) -> dict[str, Any]:
    a = run.args
    stored = run.stored_report()
    rows = _merged(stored.get("rows", []), rows, "method", "seed")
    points = _merged(stored.get("points", []), list(points), "method", "seed", "point")
    report = {
        "protocol": run.protocol, "stage": "prune", "reduced": run.reduced, "scale": run.scale(),
        "budget": {
            "iterations": a.iterations, "retrain_epochs_per_iteration": a.retrain_epochs,
            "class_aware_epochs_at_most": a.iterations * a.retrain_epochs,
            "baseline_epochs": "those behind the chosen class-aware iteration (its index x retrain epochs)",
            "retrain_lr": a.retrain_lr, "schedule": "cosine to zero per retraining run, no warm-up",
            "estimate": "about 2 min per epoch of 45,000 images at full width on 2 cores, less once pruned: 1-1.5 h "
                        "per method and seed, 5-7 h for three methods and two seeds",
        },
        "class_aware": {"max_classes": a.max_classes, "max_fraction": a.max_fraction,
                        "images_per_class": a.images_per_class, "used_threshold": a.used_threshold,
                        "class_threshold": a.class_threshold, "regularizer": a.regularizer, "floor_drop": a.floor_drop,
                        "target_macs_reduction": a.target_macs_reduction},
        "compare_at": a.compare_at, "target": TARGET, "rows": rows, "points": points,
    }
    run.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run.results / f"{STEM}.json", report)
    atomic_write_text(run.results / f"{STEM}.md", _markdown(report))
    _plot(rows, run.results / f"{STEM}_curve.png", points)
    entries = _summary_entries(rows)
    if run.results.resolve() == RESULTS.resolve():
        from bench_cnn_cpu import update_summary

        update_summary("resnet20", entries)
    else:  # a reduced-scale run keeps its summary beside its other results
        summary_path = run.results / "cnn_cpu_summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"protocol": "cifar-cpu",
                                                                                       "networks": {}}
        summary["networks"].setdefault("resnet20", {}).update(entries)
        atomic_write_json(summary_path, summary)
    return report


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Stage "prune": runs or resumes every method for every seed of `args`, then writes the results."""
    args.seed = args.seed or [2023, 2024]
    methods = args.method or list(METHODS)
    results = Path(args.results_dir) if args.results_dir else RESULTS
    reduced = any(v is not None for v in (args.train_limit, args.val_size, args.test_limit))
    if reduced and results.resolve() == RESULTS.resolve():
        raise SystemExit("a reduced-scale run (--train-limit/--val-size/--test-limit) must not write the protocol's "
                         "results: pass --results-dir")
    train, val, test = _load_splits(args)
    ctx = _Run(args, train, val, test, native_bfloat16(torch.device("cpu")), results,
               Path(args.baseline_dir) if args.baseline_dir else results / "cnn_cpu")
    report: dict[str, Any] = {}
    for seed in args.seed:
        # Written as soon as a seed is finished (merged with the rows already stored), so that a stage longer than one
        # sitting shows what it has.
        report = _write_outputs(ctx, _seed_rows(ctx, seed, methods))
    # The comparison beyond the floor comes after every seed's result: it is the less important part.
    for seed in args.seed:
        report = _write_outputs(ctx, [], _point_rows(ctx, seed, methods))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    run(args)


if __name__ == "__main__":
    main()
