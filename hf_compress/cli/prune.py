"""`hf-compress train` (any PrunedCNN on an image dataset) and `hf-compress prune` (class-aware pruning)."""

from __future__ import annotations

from typing import Optional

import typer

_DATASET_HELP = "Hub dataset (uoft-cs/cifar10), local parquet file or folder, or the alias cifar10."


def _fraction(value: float, option: str) -> float:
    """Accuracies are given as fractions (0.93) or percentages (93)."""
    from ..errors import HFCompressError

    fraction = value / 100 if value > 1 else value
    if not 0 < fraction <= 1:
        raise HFCompressError(f"{option} must be a fraction in (0, 1] or a percentage in (1, 100], got {value}")
    return fraction


def _load_splits(dataset, image_column, label_column, limit, eval_split, eval_limit, val_size, seed):
    from ..data.images import load_image_dataset, train_val_split
    from ..errors import HFCompressError

    train = load_image_dataset(dataset, "train", image_column=image_column, label_column=label_column, limit=limit, seed=seed)
    val = None
    if val_size > 0:
        if val_size >= len(train):
            raise HFCompressError(f"--val-size {val_size} leaves no training image (the train split has {len(train)})")
        train, val = train_val_split(train, n_val=val_size, seed=2023)
    test = None
    if eval_split:
        test = load_image_dataset(dataset, eval_split, image_column=image_column, label_column=label_column, limit=eval_limit, seed=seed)
        if test.class_names != train.class_names:
            raise HFCompressError(f"the {eval_split} split has classes {test.class_names}, the train split {train.class_names}")
    return train, val, test


def _prepare_output(output: str, overwrite: bool, resumable: bool = False) -> None:
    from pathlib import Path

    from ..errors import HFCompressError

    path = Path(output)
    if resumable and (path / "iterations" / "state.json").exists():
        return
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise HFCompressError(f"{output} exists and is not empty (pass --overwrite to replace it)")


def train_command(
    model: str = typer.Argument(..., help="resnet20/32/44/56/110 or vgg16 (CIFAR networks), a PrunedCNNConfig JSON, "
                                "a PrunedCNN checkpoint or a transformers ResNet checkpoint."),
    output: str = typer.Argument(..., help="Folder for the trained checkpoint."),
    dataset: str = typer.Option("cifar10", "--dataset", help=_DATASET_HELP),
    epochs: int = typer.Option(200, "--epochs"),
    lr: float = typer.Option(0.1, "--lr"),
    batch_size: int = typer.Option(128, "--batch-size"),
    weight_decay: float = typer.Option(5e-4, "--weight-decay"),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine, step (x0.1 at 50% and 75%) or constant."),
    regularizer: str = typer.Option("none", "--regularizer", help="none, orthogonal (0.01) or l1 (1e-4): class-aware training."),
    regularizer_weight: Optional[float] = typer.Option(None, "--regularizer-weight"),
    val_size: int = typer.Option(0, "--val-size", help="Hold out this many train images (seed 2023) for validation."),
    eval_split: str = typer.Option("test", "--eval-split", help="Split evaluated at the end ('' for none)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use this many training images (random, --seed)."),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit"),
    image_column: Optional[str] = typer.Option(None, "--image-column"),
    label_column: Optional[str] = typer.Option(None, "--label-column"),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Train a PrunedCNN (or a converted ResNet) on an image classification dataset."""
    from pathlib import Path

    import torch

    from .. import __version__
    from ..vision.checkpoint import save_checkpoint
    from ..class_aware.regularizers import regularized_loss
    from ..modeling.pruned_cnn import PrunedCNNConfig, PrunedCNNForImageClassification
    from ..vision.resnet_import import load_cnn
    from ..vision.training import evaluate_accuracy, train_classifier

    _prepare_output(output, overwrite)
    train, val, test = _load_splits(dataset, image_column, label_column, limit, eval_split, eval_limit, val_size, seed)
    torch.manual_seed(seed)
    if model.endswith(".json") and Path(model).is_file():
        config = PrunedCNNConfig.from_json_file(model)
        config.id2label, config.label2id = train.id2label(), {n: i for i, n in enumerate(train.class_names)}
        network, source = PrunedCNNForImageClassification(config), {"model_id": model, "revision": None}
    else:
        network, source = load_cnn(model, id2label=train.id2label())
    if network.config.num_labels != train.num_classes:
        from ..errors import HFCompressError

        raise HFCompressError(f"{model} has {network.config.num_labels} labels but {dataset} has {train.num_classes} classes")
    network.config.id2label = train.id2label()
    network.config.label2id = {name: i for i, name in enumerate(train.class_names)}
    history = train_classifier(
        network, train, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, schedule=schedule,
        loss_fn=regularized_loss(regularizer, regularizer_weight), eval_data=val, seed=seed,
    )
    summary = {
        "source": source, "dataset": dataset, "train_images": len(train), "epochs": epochs, "lr": lr,
        "batch_size": batch_size, "schedule": schedule, "regularizer": regularizer, "train_loss": history.train_loss,
        "val_accuracy": history.eval_accuracy, "hf_compress_version": __version__,
    }
    if test is not None:
        summary["test_accuracy"] = evaluate_accuracy(network, test)
        typer.echo(f"{eval_split} accuracy: {summary['test_accuracy']:.4f} ({len(test)} images)")
    network.to("cpu")
    from accelerate import PartialState

    if PartialState().is_main_process:  # one writer under `accelerate launch`
        save_checkpoint(network, output, mean=train.mean, std=train.std, extra_json={"training_summary.json": summary})
    typer.echo(f"saved {output}: params {network.config.num_parameters / 1e6:.3f}M, MACs {network.config.num_macs / 1e6:.2f}M")


def prune_command(
    model: str = typer.Argument(..., help="A trained PrunedCNN checkpoint or transformers ResNet (folder or Hub id)."),
    output: str = typer.Argument(..., help="Output folder: the pruned checkpoint, with iterations/ for resuming."),
    dataset: str = typer.Option("cifar10", "--dataset", help=_DATASET_HELP),
    accuracy_floor: float = typer.Option(..., "--accuracy-floor", help="Lowest acceptable validation accuracy (0.92 or 92)."),
    max_classes: int = typer.Option(1, "--max-classes", help="Remove filters important for at most this many classes."),
    images_per_class: int = typer.Option(32, "--images-per-class"),
    used_threshold: float = typer.Option(1.0, "--used-threshold", help="A filter is used by an image when its Taylor score "
                                         "reaches this multiple of its layer's mean."),
    class_threshold: float = typer.Option(0.5, "--class-threshold", help="Important for a class when used by this fraction of its images."),
    max_fraction: float = typer.Option(0.2, "--max-fraction", help="Most filters (fraction of all prunable) removed per iteration."),
    max_iterations: int = typer.Option(10, "--max-iterations"),
    target_macs_reduction: Optional[float] = typer.Option(None, "--target-macs-reduction", help="Stop once MACs are reduced by this fraction."),
    retrain_epochs: int = typer.Option(20, "--retrain-epochs"),
    lr: float = typer.Option(0.01, "--lr"),
    batch_size: int = typer.Option(128, "--batch-size"),
    weight_decay: float = typer.Option(5e-4, "--weight-decay"),
    regularizer: str = typer.Option("l1", "--regularizer", help="none, orthogonal (0.01) or l1 (1e-4, default: chosen by measurement, see docs)."),
    regularizer_weight: Optional[float] = typer.Option(None, "--regularizer-weight"),
    val_size: int = typer.Option(5000, "--val-size", help="Train images held out (seed 2023) to check the floor."),
    eval_split: str = typer.Option("test", "--eval-split", help="Split reported after each iteration ('' for none)."),
    limit: Optional[int] = typer.Option(None, "--limit"),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit"),
    image_column: Optional[str] = typer.Option(None, "--image-column"),
    label_column: Optional[str] = typer.Option(None, "--label-column"),
    revision: Optional[str] = typer.Option(None, "--revision"),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUTPUT that holds no resumable run."),
) -> None:
    """Class-aware pruning (DATE 2024): remove filters that matter to few classes, retrain, repeat; resumes OUTPUT."""
    from ..class_aware.api import ClassAwareSettings, class_aware_prune, summary_table
    from ..errors import HFCompressError
    from ..vision.resnet_import import load_cnn

    floor = _fraction(accuracy_floor, "--accuracy-floor")
    _prepare_output(output, overwrite, resumable=True)
    if val_size <= 0:
        raise HFCompressError("--val-size must be positive: the accuracy floor is checked on held-out train images")
    network, source = load_cnn(model, revision=revision)
    train, val, test = _load_splits(dataset, image_column, label_column, limit, eval_split, eval_limit, val_size, seed)
    target = None
    if target_macs_reduction is not None:
        if not 0 < target_macs_reduction < 1:
            raise HFCompressError(f"--target-macs-reduction must be in (0, 1), got {target_macs_reduction}")
        target = int(network.config.num_macs * (1 - target_macs_reduction))
    settings = ClassAwareSettings(
        accuracy_floor=floor, max_classes=max_classes, images_per_class=images_per_class, used_threshold=used_threshold,
        class_threshold=class_threshold, max_fraction=max_fraction, max_iterations=max_iterations, target_macs=target,
        retrain_epochs=retrain_epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, regularizer=regularizer,
        regularizer_weight=regularizer_weight, seed=seed,
    )
    result = class_aware_prune(network, train, val, output, settings, test_data=test, source=source, dataset=dataset)
    typer.echo(summary_table(result.rows))
    best = next(r for r in result.rows if r["iteration"] == result.best_iteration)
    base = result.rows[0]
    typer.echo(
        f"stopped: {result.stop_reason}. Saved iteration {best['iteration']} to {output}: MACs "
        f"{base['macs'] / 1e6:.2f}M -> {best['macs'] / 1e6:.2f}M ({100 * (1 - best['macs'] / base['macs']):.1f}% fewer), "
        f"params {base['params'] / 1e6:.3f}M -> {best['params'] / 1e6:.3f}M"
    )


def register(app: typer.Typer) -> None:
    """Adds `train` and `prune` to `app`."""
    app.command("train")(train_command)
    app.command("prune")(prune_command)
