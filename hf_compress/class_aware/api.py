"""The class-aware pruning loop (Jiang et al., DATE 2024): score, remove, retrain, repeat.

Each iteration scores every prunable filter per class (`importance.class_importance`), removes the
filters important for at most `max_classes` classes (`importance.select_filters`), physically shrinks the
network (`pruning.shrink`) and retrains it with the class-specificity regulariser. The loop stops when no
filter can be removed, when the validation accuracy after retraining falls below the floor, at a MAC
target, or after `max_iterations`. The smallest model that meets the floor is the result.

Every iteration is saved under `OUTPUT/iterations/iter_XXX/` with `OUTPUT/iterations/state.json` updated
after it, so an interrupted run resumes from the last finished iteration; the final model is written to
`OUTPUT/` itself, last.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..vision.checkpoint import save_checkpoint
from ..data.images import ImageClassificationData
from ..errors import HFCompressError
from ..modeling.pruned_cnn import PrunedCNNForImageClassification
from ..vision.training import evaluate_accuracy, train_classifier
from .importance import class_importance, select_filters
from .regularizers import regularized_loss
from .shrink import shrink

STATE_FILE = "state.json"


@dataclass
class ClassAwareSettings:
    """Settings of `class_aware_prune` (see the module docstring and `importance` for the scores).

    `accuracy_floor` is a fraction (0.925); `target_macs`, when set, stops the loop once MACs are at or below it.
    """

    accuracy_floor: float
    max_classes: int = 1
    images_per_class: int = 32
    used_threshold: float = 1.0
    class_threshold: float = 0.5
    max_fraction: float = 0.2
    max_iterations: int = 10
    target_macs: int | None = None
    retrain_epochs: int = 20
    lr: float = 0.01
    batch_size: int = 128
    weight_decay: float = 5e-4
    regularizer: str = "l1"
    regularizer_weight: float | None = None
    seed: int = 0


@dataclass
class PruningResult:
    model: PrunedCNNForImageClassification
    rows: list[dict[str, Any]] = field(default_factory=list)
    best_iteration: int = 0
    stop_reason: str = ""


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the iterations (params, MACs, accuracies)."""
    lines = [
        "| iteration | params | MACs | filters removed | val acc | test acc | meets floor |",
        "|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for row in rows:
        test = f"{100 * row['test_accuracy']:.2f}%" if row.get("test_accuracy") is not None else "-"
        lines.append(
            f"| {row['iteration']} | {row['params'] / 1e6:.3f}M | {row['macs'] / 1e6:.2f}M | {row['filters_removed']} "
            f"| {100 * row['val_accuracy']:.2f}% | {test} | {'yes' if row['meets_floor'] else 'no'} |"
        )
    return "\n".join(lines)


def _write_json_atomic(path: Path, content: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(tmp, path)


def class_aware_prune(
    model: PrunedCNNForImageClassification,
    train_data: ImageClassificationData,
    val_data: ImageClassificationData,
    output_dir: str | Path,
    settings: ClassAwareSettings,
    *,
    test_data: ImageClassificationData | None = None,
    source: dict[str, Any] | None = None,
    dataset: str | None = None,
    accelerator=None,
    progress: bool = True,
) -> PruningResult:
    """Runs class-aware pruning of `model` and writes the result to `output_dir` (resuming a run found there).

    Args:
        model: the trained network to prune (its accuracy on `val_data` is the baseline).
        train_data: images for retraining and for the per-class importance scores.
        val_data: accuracy checked against the floor after every iteration.
        test_data: also evaluated and reported when given (never used for decisions).
        source, dataset: provenance recorded in `config.compression`.

    Returns:
        A `PruningResult` with the best model (smallest MACs meeting the floor), the summary rows and why it stopped.
    """
    from accelerate import Accelerator

    from .. import __version__

    if settings.max_classes < 0 or not 0 < settings.max_fraction <= 1:
        raise HFCompressError(f"max_classes must be >= 0 and max_fraction in (0, 1], got {settings.max_classes}, {settings.max_fraction}")
    if model.config.num_labels != train_data.num_classes:
        raise HFCompressError(
            f"the model has {model.config.num_labels} labels but the dataset has {train_data.num_classes} classes"
        )
    accelerator = accelerator or Accelerator()
    device = accelerator.device
    output_dir = Path(output_dir)
    work = output_dir / "iterations"
    state_path = work / STATE_FILE
    loss_fn = regularized_loss(settings.regularizer, settings.regularizer_weight)

    def evaluate(net) -> tuple[float, float | None]:
        val = evaluate_accuracy(net, val_data, bf16=device.type == "cuda")
        test = evaluate_accuracy(net, test_data, bf16=device.type == "cuda") if test_data is not None else None
        return val, test

    # Under `accelerate launch` every process runs the same deterministic scoring and selection and
    # trains in sync; only the main process writes.
    def save_iteration(net, index: int) -> None:
        if accelerator.is_main_process:
            save_checkpoint(net, work / f"iter_{index:03d}", mean=train_data.mean, std=train_data.std)
        accelerator.wait_for_everyone()

    def write_state(content: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            _write_json_atomic(state_path, content)
        accelerator.wait_for_everyone()

    if state_path.exists():
        state = json.loads(state_path.read_text())
        rows = state["rows"]
        if state["settings"]["accuracy_floor"] != settings.accuracy_floor:
            raise HFCompressError(
                f"{output_dir} holds a run with accuracy floor {state['settings']['accuracy_floor']}; "
                "use the same settings to resume or another output folder"
            )
        model = PrunedCNNForImageClassification.from_pretrained(work / f"iter_{rows[-1]['iteration']:03d}")
        if progress:
            tqdm.write(f"resuming {output_dir} after iteration {rows[-1]['iteration']}")
    else:
        model.to(device)
        val_acc, test_acc = evaluate(model)
        if settings.accuracy_floor > val_acc:
            raise HFCompressError(
                f"accuracy floor {settings.accuracy_floor:.4f} is above the model's own validation accuracy "
                f"{val_acc:.4f}: no pruned model can be expected to meet it"
            )
        rows = [_row(model, 0, 0, val_acc, test_acc, True)]
        if accelerator.is_main_process:
            work.mkdir(parents=True, exist_ok=True)
        save_iteration(model, 0)
        state = {"settings": asdict(settings), "rows": rows, "stop_reason": None}
        write_state(state)
    model.to(device)

    # Re-checked on resume: a run stopped at max_iterations continues when given more.
    stop_reason = None
    progress = progress and accelerator.is_local_main_process
    bar = tqdm(total=settings.max_iterations, initial=rows[-1]["iteration"], desc="class-aware pruning", disable=not progress)
    while stop_reason is None:
        iteration = rows[-1]["iteration"] + 1
        if not rows[-1]["meets_floor"]:
            stop_reason = f"accuracy {rows[-1]['val_accuracy']:.4f} fell below the floor {settings.accuracy_floor:.4f}"
            break
        if iteration > settings.max_iterations:
            stop_reason = f"reached {settings.max_iterations} iterations"
            break
        if settings.target_macs is not None and rows[-1]["macs"] <= settings.target_macs:
            stop_reason = f"reached the MAC target {settings.target_macs}"
            break
        importance = class_importance(
            model, train_data, images_per_class=settings.images_per_class,
            used_threshold=settings.used_threshold, class_threshold=settings.class_threshold,
        )
        keep, removed = select_filters(model, importance, max_classes=settings.max_classes, max_fraction=settings.max_fraction)
        if removed == 0:
            stop_reason = "no filter can be removed"
            break
        pruned = shrink(model, keep)
        train_classifier(
            pruned, train_data, epochs=settings.retrain_epochs, lr=settings.lr, batch_size=settings.batch_size,
            weight_decay=settings.weight_decay, loss_fn=loss_fn, accelerator=accelerator,
            seed=settings.seed + iteration, progress=progress, desc=f"retrain {iteration}",
        )
        val_acc, test_acc = evaluate(pruned)
        row = _row(pruned, iteration, removed, val_acc, test_acc, val_acc >= settings.accuracy_floor)
        save_iteration(pruned, iteration)
        rows.append(row)
        write_state({**state, "rows": rows})
        bar.update(1)
        if progress:
            tqdm.write(
                f"iteration {iteration}: removed {removed} filters, MACs {row['macs'] / 1e6:.2f}M, "
                f"params {row['params'] / 1e6:.3f}M, val acc {val_acc:.4f}"
            )
        if row["meets_floor"]:
            model = pruned
    bar.close()
    write_state({**state, "rows": rows, "stop_reason": stop_reason})

    best = min((r for r in rows if r["meets_floor"]), key=lambda r: (r["macs"], -r["val_accuracy"]))
    final = PrunedCNNForImageClassification.from_pretrained(work / f"iter_{best['iteration']:03d}")
    base = rows[0]
    final.config.compression = {
        "method": "class_aware_pruning",
        "source": source or {"model_id": None, "revision": None},
        "params_before": base["params"],
        "params_after": best["params"],
        "macs_before": base["macs"],
        "macs_after": best["macs"],
        "accuracy_before": base["test_accuracy"] if base.get("test_accuracy") is not None else base["val_accuracy"],
        "accuracy_after": best["test_accuracy"] if best.get("test_accuracy") is not None else best["val_accuracy"],
        "accuracy_split": "test" if best.get("test_accuracy") is not None else "validation",
        "accuracy_floor": settings.accuracy_floor,
        "dataset": dataset,
        "iterations": rows,
        "best_iteration": best["iteration"],
        "stop_reason": stop_reason,
        "settings": asdict(settings),
        "hf_compress_version": __version__,
    }
    if accelerator.is_main_process:
        save_checkpoint(final, output_dir, mean=train_data.mean, std=train_data.std, carry=["iterations"])
    accelerator.wait_for_everyone()
    return PruningResult(model=final, rows=rows, best_iteration=best["iteration"], stop_reason=stop_reason)


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
