"""The class-aware pruning loop (Jiang et al., DATE 2024): score, remove, retrain, repeat.

Each iteration scores every prunable filter per class (`importance.class_importance`), removes the filters important
for at most `max_classes` classes (`importance.select_filters`), physically shrinks the network (`shrink.shrink`) and
retrains it with the class-specificity regulariser. The loop stops when no filter can be removed, when the validation
accuracy after retraining falls below the floor, at a MAC target, or after `max_iterations`. The smallest model that
meets the floor is the result.

Every iteration is saved under `OUTPUT/iterations/iter_XXX/` with `OUTPUT/iterations/state.json` updated after it, so
an interrupted run resumes from the last finished iteration; the final model is written to `OUTPUT/` itself, last
(`record.write_result`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from ..checkpoint import atomic_write_json
from ..data.images import ImageClassificationData
from ..errors import HFCompressError
from ..modeling.pruned_cnn import PrunedCNNForImageClassification
from ..provenance import DataRef, SourceRef
from ..vision.checkpoint import save_checkpoint
from ..vision.training import evaluate_accuracy, train_classifier
from .config import ClassAwareConfig
from .importance import class_importance, select_filters
from .record import PruningResult, best_row, write_result
from .regularizers import regularized_loss
from .shrink import shrink

ITERATIONS_DIR = "iterations"
STATE_FILE = "state.json"


@dataclass
class _Run:
    """What every step of one pruning run reads: the data, the config, the work folder and the accelerator.

    Under `accelerate launch` every process runs the same deterministic scoring and selection and trains in sync;
    only the main process writes.
    """

    train_data: ImageClassificationData
    val_data: ImageClassificationData
    test_data: ImageClassificationData | None
    config: ClassAwareConfig
    output_dir: Path
    accelerator: Any
    progress: bool

    @property
    def work(self) -> Path:
        return self.output_dir / ITERATIONS_DIR

    def evaluate(self, model: PrunedCNNForImageClassification) -> tuple[float, float | None]:
        """Validation accuracy (checked against the floor) and test accuracy (reported only)."""
        bf16 = self.accelerator.device.type == "cuda"
        val = evaluate_accuracy(model, self.val_data, bf16=bf16)
        test = evaluate_accuracy(model, self.test_data, bf16=bf16) if self.test_data is not None else None
        return val, test

    def save_iteration(self, model: PrunedCNNForImageClassification, index: int) -> None:
        if self.accelerator.is_main_process:
            save_checkpoint(model, self.iteration_dir(index), mean=self.train_data.mean, std=self.train_data.std)
        self.accelerator.wait_for_everyone()

    def iteration_dir(self, index: int) -> Path:
        return self.work / f"iter_{index:03d}"

    def write_state(self, rows: list[dict[str, Any]], stop_reason: str | None = None) -> None:
        if self.accelerator.is_main_process:
            content = {"options": self.config.to_dict(), "rows": rows, "stop_reason": stop_reason}
            atomic_write_json(self.work / STATE_FILE, content)
        self.accelerator.wait_for_everyone()


def _row(model, iteration: int, removed: int, val_acc: float, test_acc: float | None, meets: bool) -> dict[str, Any]:
    return {
        "iteration": iteration,
        "params": int(model.config.num_parameters),
        "macs": int(model.config.num_macs),
        "filters_removed": removed,
        "val_accuracy": val_acc,
        "test_accuracy": test_acc,
        "meets_floor": bool(meets),
    }


def _resume(run: _Run) -> tuple[PrunedCNNForImageClassification, list[dict[str, Any]]]:
    """The last finished iteration of the run in `run.work`, and the rows so far."""
    state = json.loads((run.work / STATE_FILE).read_text())
    # State files written before the provenance record named the config "settings".
    options = state.get("options", state.get("settings"))
    if options["accuracy_floor"] != run.config.accuracy_floor:
        raise HFCompressError(
            f"{run.output_dir} holds a run with accuracy floor {options['accuracy_floor']}; "
            "use the same settings to resume or another output folder"
        )
    rows = state["rows"]
    if run.progress:
        tqdm.write(f"resuming {run.output_dir} after iteration {rows[-1]['iteration']}")
    return PrunedCNNForImageClassification.from_pretrained(run.iteration_dir(rows[-1]["iteration"])), rows


def _start(run: _Run, model: PrunedCNNForImageClassification) -> list[dict[str, Any]]:
    """Evaluates the source (iteration 0), refuses a floor above it, and saves it as the first iteration."""
    model.to(run.accelerator.device)
    val_acc, test_acc = run.evaluate(model)
    if run.config.accuracy_floor > val_acc:
        raise HFCompressError(
            f"accuracy floor {run.config.accuracy_floor:.4f} is above the model's own validation accuracy "
            f"{val_acc:.4f}: no pruned model can be expected to meet it"
        )
    rows = [_row(model, 0, 0, val_acc, test_acc, True)]
    if run.accelerator.is_main_process:
        run.work.mkdir(parents=True, exist_ok=True)
    run.save_iteration(model, 0)
    run.write_state(rows)
    return rows


def _stop_reason(config: ClassAwareConfig, rows: list[dict[str, Any]]) -> str | None:
    """Why the loop stops before the next iteration, or None. Re-checked on resume: a run stopped at
    `max_iterations` continues when given more."""
    last = rows[-1]
    if not last["meets_floor"]:
        return f"accuracy {last['val_accuracy']:.4f} fell below the floor {config.accuracy_floor:.4f}"
    if last["iteration"] + 1 > config.max_iterations:
        return f"reached {config.max_iterations} iterations"
    target = config.mac_target(rows[0]["macs"])
    if target is not None and last["macs"] <= target:
        return f"reached the MAC target {target}"
    return None


def _iteration(run: _Run, model: PrunedCNNForImageClassification, iteration: int, loss_fn):
    """One iteration: score, select, shrink, retrain, evaluate, save. Returns `(pruned model, row)`, or None when
    no filter can be removed."""
    config = run.config
    importance = class_importance(model, run.train_data, images_per_class=config.images_per_class,
                                  used_threshold=config.used_threshold, class_threshold=config.class_threshold)
    keep, removed = select_filters(model, importance, max_classes=config.max_classes, max_fraction=config.max_fraction)
    if removed == 0:
        return None
    pruned = shrink(model, keep)
    train_classifier(
        pruned, run.train_data, epochs=config.retrain_epochs, lr=config.lr, batch_size=config.batch_size,
        weight_decay=config.weight_decay, loss_fn=loss_fn, accelerator=run.accelerator,
        seed=config.seed + iteration, progress=run.progress, desc=f"retrain {iteration}",
    )
    val_acc, test_acc = run.evaluate(pruned)
    row = _row(pruned, iteration, removed, val_acc, test_acc, val_acc >= config.accuracy_floor)
    run.save_iteration(pruned, iteration)
    if run.progress:
        tqdm.write(f"iteration {iteration}: removed {removed} filters, MACs {row['macs'] / 1e6:.2f}M, "
                   f"params {row['params'] / 1e6:.3f}M, val acc {val_acc:.4f}")
    return pruned, row


def _iterate(run: _Run, model: PrunedCNNForImageClassification, rows: list[dict[str, Any]]) -> str:
    """Runs iterations until one of the stop conditions holds (appending to `rows`); returns why it stopped."""
    loss_fn = regularized_loss(run.config.regularizer, run.config.regularizer_weight)
    bar = tqdm(total=run.config.max_iterations, initial=rows[-1]["iteration"], desc="class-aware pruning",
               disable=not run.progress)
    while (stop_reason := _stop_reason(run.config, rows)) is None:
        outcome = _iteration(run, model, rows[-1]["iteration"] + 1, loss_fn)
        if outcome is None:
            stop_reason = "no filter can be removed"
            break
        pruned, row = outcome
        rows.append(row)
        run.write_state(rows)
        bar.update(1)
        if row["meets_floor"]:
            model = pruned
    bar.close()
    return stop_reason


def class_aware_prune(
    model: PrunedCNNForImageClassification,
    train_data: ImageClassificationData,
    val_data: ImageClassificationData,
    output_dir: str | Path,
    config: ClassAwareConfig,
    *,
    test_data: ImageClassificationData | None = None,
    source: SourceRef | None = None,
    data: Sequence[DataRef] = (),
    accelerator=None,
    progress: bool = True,
) -> PruningResult:
    """Runs class-aware pruning of a loaded `model` on loaded splits and writes the result to `output_dir`
    (resuming a run found there). `prune` is the entry point that loads both.

    Args:
        model: the trained network to prune (its accuracy on `val_data` is the baseline).
        train_data: images for retraining and for the per-class importance scores.
        val_data: accuracy checked against the floor after every iteration.
        test_data: also evaluated and reported when given (never used for decisions).
        source, data: provenance recorded in `config.compression`.

    Returns:
        A `PruningResult` with the best model (smallest MACs meeting the floor), the summary rows and why it stopped.
    """
    from accelerate import Accelerator

    config.validate()
    if model.config.num_labels != train_data.num_classes:
        raise HFCompressError(
            f"the model has {model.config.num_labels} labels but the dataset has {train_data.num_classes} classes"
        )
    accelerator = accelerator or Accelerator()
    run = _Run(train_data, val_data, test_data, config, Path(output_dir), accelerator,
               progress and accelerator.is_local_main_process)
    if (run.work / STATE_FILE).exists():
        model, rows = _resume(run)
    else:
        rows = _start(run, model)
    model.to(accelerator.device)
    stop_reason = _iterate(run, model, rows)
    run.write_state(rows, stop_reason)
    best = best_row(rows)
    final = PrunedCNNForImageClassification.from_pretrained(run.iteration_dir(best["iteration"]))
    write_result(final, run.output_dir, config, rows, stop_reason, source or SourceRef(None), list(data),
                 mean=train_data.mean, std=train_data.std, accelerator=accelerator, carry=[ITERATIONS_DIR])
    return PruningResult(model=final, rows=rows, best_iteration=best["iteration"], stop_reason=stop_reason)
