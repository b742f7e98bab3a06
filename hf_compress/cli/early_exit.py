"""`hf-compress early-exit` (class-exclusion early exit, issue 6) and `hf-compress exit-report`."""

from __future__ import annotations

from typing import Optional

import typer

from ..early_exit.config import DEFAULT_EXIT_POOL_SIZE, REPORT_BATCH_SIZE, EarlyExitConfig


def _positions(value: Optional[str]) -> Optional[list[str]]:
    if value is None:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


_DEFAULTS = EarlyExitConfig()


def early_exit_command(
    model: str = typer.Argument(..., help="A transformers ResNet, a ResNet PrunedCNN from `hf-compress train`, "
                                          "or a ClassExitResNet (folder or Hub id)."),
    output: str = typer.Argument(..., help="Output folder; it appears only once the checkpoint is complete."),
    dataset: str = typer.Option(_DEFAULTS.dataset, "--dataset",
                                help="'cifar10', a local parquet file/folder or a Hub dataset."),
    tolerance: float = typer.Option(_DEFAULTS.tolerance, "--tolerance",
                                    help="Validation accuracy the exits may lose (0.005 = 0.5 points)."),
    rule: str = typer.Option(_DEFAULTS.exit_rule, "--rule",
                             help="class_exclusion, or confidence (the max-softmax baseline)."),
    exits: Optional[str] = typer.Option(None, "--exits", help="Comma-separated exit positions: stem, stageI, stageI.J "
                                                               "(default: middle and end of every stage)."),
    pool_size: Optional[int] = typer.Option(_DEFAULTS.exit_pool_size, "--exit-pool-size",
                                            help="Pooled side of each exit head (default: the source's, "
                                                 f"{DEFAULT_EXIT_POOL_SIZE} for a network without exits)."),
    epochs: int = typer.Option(_DEFAULTS.epochs, "--epochs",
                               help="Training epochs (backbone and heads, or the heads alone with --frozen-backbone)."),
    train_backbone: bool = typer.Option(_DEFAULTS.train_backbone, "--train-backbone/--frozen-backbone",
                                        help="Train the backbone jointly with the exit heads, or train the heads "
                                             "alone and keep the backbone's weights unchanged."),
    lr: float = typer.Option(_DEFAULTS.lr, "--lr", help="Peak SGD learning rate (cosine schedule)."),
    batch_size: int = typer.Option(_DEFAULTS.batch_size, "--batch-size"),
    n_val: int = typer.Option(_DEFAULTS.n_val, "--n-val", help="Training images held out for the threshold search."),
    train_limit: Optional[int] = typer.Option(_DEFAULTS.train_limit, "--train-limit",
                                              help="Use a random subset of the training split."),
    test_split: str = typer.Option(_DEFAULTS.test_split or "", "--test-split",
                                   help="Split reported at the end ('' to skip)."),
    test_limit: Optional[int] = typer.Option(_DEFAULTS.test_limit, "--test-limit"),
    step: float = typer.Option(_DEFAULTS.step, "--step", help="Threshold search step, in (0, 1)."),
    cost: str = typer.Option(_DEFAULTS.cost, "--cost",
                             help="What the threshold search minimises: macs, or latency (time per image of each "
                                  "unit and head, measured on this device)."),
    seed: int = typer.Option(_DEFAULTS.seed, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Attach class-exclusion exits to a ResNet, train them (jointly by default), search thresholds, save a
    ClassExitResNet."""
    from ..early_exit import add_early_exits

    config = EarlyExitConfig(
        dataset=dataset, tolerance=tolerance, exit_rule=rule, exit_positions=_positions(exits), exit_pool_size=pool_size,
        epochs=epochs, train_backbone=train_backbone, lr=lr, batch_size=batch_size, n_val=n_val, train_limit=train_limit,
        test_split=test_split or None, test_limit=test_limit, step=step, seed=seed, cost=cost,
    )
    result = add_early_exits(model, output, config, overwrite=overwrite, progress=progress)
    typer.echo(f"saved {output}")
    typer.echo(f"exits {result.config.exit_positions}, thresholds {result.thresholds}")
    typer.echo(
        f"{result.dataset}: accuracy {100 * result.accuracy_full:.2f}% (full) -> "
        f"{100 * result.accuracy_early_exit:.2f}% (early exit); MACs {result.macs_full / 1e6:.2f}M -> "
        f"{result.mean_macs / 1e6:.2f}M mean ({1 - result.mean_macs / result.macs_full:.1%} fewer)"
    )


def exit_report_command(
    model: str = typer.Argument(..., help="A ClassExitResNet checkpoint (folder or Hub id)."),
    dataset: str = typer.Option(_DEFAULTS.dataset, "--dataset"),
    split: str = typer.Option(_DEFAULTS.test_split, "--split"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Random subset of the split."),
    batch_size: int = typer.Option(REPORT_BATCH_SIZE, "--batch-size"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, ... (default: cuda if present)."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Also write the report as JSON here."),
) -> None:
    """Accuracy, mean MACs and share of samples leaving at each exit (overall and per class)."""
    from ..checkpoint import atomic_write_json
    from ..early_exit.report import report_checkpoint, report_markdown

    report = report_checkpoint(model, dataset, split, limit=limit, batch_size=batch_size, device=device)
    typer.echo(report_markdown(report), nl=False)
    if json_path:
        atomic_write_json(json_path, report)


def register(app: typer.Typer) -> None:
    """Adds this group's commands to `app`."""
    app.command("early-exit")(early_exit_command)
    app.command("exit-report")(exit_report_command)
