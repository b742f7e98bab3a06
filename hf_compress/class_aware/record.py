"""The result of a class-aware pruning run: the best iteration, its provenance record, the saved checkpoint and the
summary table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..modeling.pruned_cnn import PrunedCNNForImageClassification
from ..provenance import DataRef, SourceRef, provenance
from ..vision.checkpoint import save_checkpoint
from .config import ClassAwareConfig

METHOD = "class_aware_pruning"


@dataclass
class PruningResult:
    """What `prune` / `class_aware_prune` return.

    Args:
        model: the saved model (the smallest iteration meeting the floor).
        rows: one row per iteration (`iteration`, `params`, `macs`, `filters_removed`, `val_accuracy`,
            `test_accuracy`, `meets_floor`); row 0 is the source.
        best_iteration: the iteration saved as the model.
        stop_reason: why the loop stopped.
    """

    model: PrunedCNNForImageClassification
    rows: list[dict[str, Any]] = field(default_factory=list)
    best_iteration: int = 0
    stop_reason: str = ""


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row of the smallest model (MACs, then the higher validation accuracy) that meets the floor."""
    return min((r for r in rows if r["meets_floor"]), key=lambda r: (r["macs"], -r["val_accuracy"]))


def _accuracy(row: dict[str, Any]) -> float:
    """The reported accuracy of a row: test when it was measured, else validation."""
    return row["test_accuracy"] if row.get("test_accuracy") is not None else row["val_accuracy"]


def compression_record(config: ClassAwareConfig, rows: list[dict[str, Any]], stop_reason: str, source: SourceRef,
                       data: list[DataRef]) -> dict[str, Any]:
    """The `config.compression` provenance record of a finished run."""
    base, best = rows[0], best_row(rows)
    figures = {
        "params_before": base["params"],
        "params_after": best["params"],
        "macs_before": base["macs"],
        "macs_after": best["macs"],
        "accuracy_before": _accuracy(base),
        "accuracy_after": _accuracy(best),
        "accuracy_split": "test" if best.get("test_accuracy") is not None else "validation",
        "iterations": rows,
        "best_iteration": best["iteration"],
        "stop_reason": stop_reason,
    }
    return provenance(METHOD, config, source, data, figures)


def write_result(model: PrunedCNNForImageClassification, output_dir: Path, config: ClassAwareConfig,
                 rows: list[dict[str, Any]], stop_reason: str, source: SourceRef, data: list[DataRef], *,
                 mean: Sequence[float], std: Sequence[float], accelerator, carry: Sequence[str] = ()) -> None:
    """Stamps the provenance record on `model` and saves it to `output_dir` (main process only), keeping `carry`."""
    model.config.compression = compression_record(config, rows, stop_reason, source, data)
    if accelerator.is_main_process:
        save_checkpoint(model, output_dir, mean=mean, std=std, carry=carry)
    accelerator.wait_for_everyone()


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


def result_line(result: PruningResult, output_dir: str | Path) -> str:
    """One line: why the run stopped, which iteration was saved, and the MAC and parameter reductions."""
    best = next(r for r in result.rows if r["iteration"] == result.best_iteration)
    base = result.rows[0]
    return (
        f"stopped: {result.stop_reason}. Saved iteration {best['iteration']} to {output_dir}: MACs "
        f"{base['macs'] / 1e6:.2f}M -> {best['macs'] / 1e6:.2f}M ({100 * (1 - best['macs'] / base['macs']):.1f}% fewer), "
        f"params {base['params'] / 1e6:.3f}M -> {best['params'] / 1e6:.3f}M"
    )
