"""`hf-compress early-exit` (class-exclusion early exit, issue 6) and `hf-compress exit-report`."""

from __future__ import annotations

import json
from typing import Optional

import typer


def _positions(value: Optional[str]) -> Optional[list[str]]:
    if value is None:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


def early_exit_command(
    model: str = typer.Argument(..., help="A transformers ResNet, a ResNet PrunedCNN from `hf-compress train`, or a ClassExitResNet (folder or Hub id)."),
    output: str = typer.Argument(..., help="Output folder; it appears only once the checkpoint is complete."),
    dataset: str = typer.Option("cifar10", "--dataset", help="'cifar10', a local parquet file/folder or a Hub dataset."),
    tolerance: float = typer.Option(0.005, "--tolerance", help="Validation accuracy the exits may lose (0.005 = 0.5 points)."),
    rule: str = typer.Option("class_exclusion", "--rule", help="class_exclusion, or confidence (the max-softmax baseline)."),
    exits: Optional[str] = typer.Option(None, "--exits", help="Comma-separated exit positions: stem, stageI, stageI.J "
                                                               "(default: middle and end of every stage)."),
    pool_size: Optional[int] = typer.Option(None, "--exit-pool-size", help="Pooled side of each exit head (default 2)."),
    epochs: int = typer.Option(10, "--epochs", help="Joint training epochs (backbone and heads)."),
    lr: float = typer.Option(0.01, "--lr", help="Peak SGD learning rate (cosine schedule)."),
    batch_size: int = typer.Option(128, "--batch-size"),
    n_val: int = typer.Option(5000, "--n-val", help="Training images held out for the threshold search."),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", help="Use a random subset of the training split."),
    test_split: str = typer.Option("test", "--test-split", help="Split reported at the end ('' to skip)."),
    test_limit: Optional[int] = typer.Option(None, "--test-limit"),
    step: float = typer.Option(0.01, "--step", help="Threshold search step."),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Attach class-exclusion exits to a ResNet, train them jointly, search thresholds, save a ClassExitResNet."""
    from ..early_exit.api import EarlyExitOptions, run_early_exit

    options = EarlyExitOptions(
        dataset=dataset, tolerance=tolerance, exit_rule=rule, exit_positions=_positions(exits), exit_pool_size=pool_size,
        epochs=epochs, lr=lr, batch_size=batch_size, n_val=n_val, train_limit=train_limit,
        test_split=test_split or None, test_limit=test_limit, step=step, seed=seed,
    )
    record = run_early_exit(model, output, options, overwrite=overwrite, progress=progress)
    thresholds = record.get("betas", record.get("confidence_thresholds"))
    typer.echo(f"saved {output}")
    typer.echo(f"exits {record['exit_positions']}, thresholds {thresholds}")
    typer.echo(
        f"{record['dataset']}: accuracy {100 * record['accuracy_full']:.2f}% (full) -> "
        f"{100 * record['accuracy_early_exit']:.2f}% (early exit); MACs {record['macs_full'] / 1e6:.2f}M -> "
        f"{record['mean_macs'] / 1e6:.2f}M mean ({1 - record['mean_macs'] / record['macs_full']:.1%} fewer)"
    )


def exit_report_command(
    model: str = typer.Argument(..., help="A ClassExitResNet checkpoint (folder or Hub id)."),
    dataset: str = typer.Option("cifar10", "--dataset"),
    split: str = typer.Option("test", "--split"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Random subset of the split."),
    batch_size: int = typer.Option(256, "--batch-size"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, ... (default: cuda if present)."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Also write the report as JSON here."),
) -> None:
    """Accuracy, mean MACs and share of samples leaving at each exit (overall and per class)."""
    import torch

    from ..data.images import load_image_dataset
    from ..early_exit.search import exit_report, report_markdown
    from ..errors import HFCompressError
    from ..modeling.class_exit_resnet import ClassExitResNetForImageClassification

    try:
        network = ClassExitResNetForImageClassification.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise HFCompressError(f"cannot load a ClassExitResNet from {model}: {err}") from None
    network.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = load_image_dataset(dataset, split, limit=limit, **_normalisation(model))
    report = exit_report(network, data, batch_size=batch_size, progress=True)
    typer.echo(report_markdown(report), nl=False)
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(report, handle, indent=2)


def _normalisation(model: str) -> dict:
    """The mean and std of the checkpoint's image processor, so the report sees what the model was trained on."""
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(model)
        return {"mean": tuple(processor.image_mean), "std": tuple(processor.image_std)}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def register(app: typer.Typer) -> None:
    """Adds this group's commands to `app`."""
    app.command("early-exit")(early_exit_command)
    app.command("exit-report")(exit_report_command)
