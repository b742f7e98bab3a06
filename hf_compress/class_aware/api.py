"""Entry points of class-aware pruning and CNN training: `prune` and `train` (what `hf-compress prune` and
`hf-compress train` call).

Both load the source (a PrunedCNN checkpoint, a transformers ResNet checkpoint, a Hub id, an architecture name or,
for `prune`, an already-loaded PrunedCNN) and the image data themselves; `loop.class_aware_prune` is the loop on
loaded objects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import HFCompressError
from ..modeling.pruned_cnn import PrunedCNNForImageClassification
from ..provenance import SourceRef
from .config import ClassAwareConfig, ImageDataConfig, TrainConfig
from .data import data_refs, load_splits
from .loop import ITERATIONS_DIR, STATE_FILE, class_aware_prune
from .record import PruningResult

TRAINING_SUMMARY = "training_summary.json"


def _load_source(
    source: str | Path | PrunedCNNForImageClassification, revision: str | None
) -> tuple[PrunedCNNForImageClassification, SourceRef]:
    """The network to prune and its provenance (a loaded model by the name or folder it was loaded from)."""
    from ..vision.resnet_import import load_cnn

    if isinstance(source, PrunedCNNForImageClassification):
        return source, SourceRef.of(getattr(source.config, "_name_or_path", None) or None, revision)
    return load_cnn(str(source), revision=revision)


def prune(
    source: str | Path | PrunedCNNForImageClassification,
    output_dir: str | Path,
    config: ClassAwareConfig,
    *,
    data: ImageDataConfig | None = None,
    revision: str | None = None,
    accelerator=None,
    overwrite: bool = False,
    progress: bool = True,
) -> PruningResult:
    """Class-aware pruning of `source` on `data`, saved to `output_dir` (a run found there is resumed).

    Args:
        source: a trained PrunedCNN (loaded, or its checkpoint folder / Hub id) or a transformers ResNet checkpoint.
        config: the pruning settings; `config.val_size` train images are held out to check the floor.
        data: the dataset and evaluation split (default: CIFAR-10, test split reported).
        revision: Hub revision of `source`.
        overwrite: replace a non-empty `output_dir` that holds no resumable run.

    Returns:
        A `PruningResult`; the saved checkpoint's `config.compression` holds the provenance record.
    """
    from ..vision.checkpoint import prepare_vision_output

    config.validate()
    data = data or ImageDataConfig()
    data.validate()
    # Only a folder holding this command's own unfinished work continues without --overwrite: a finished checkpoint
    # from `train` is ours too, but pruning into it would replace it.
    resumable = (Path(output_dir).expanduser() / ITERATIONS_DIR / STATE_FILE).is_file()
    output_dir = prepare_vision_output(output_dir, overwrite=overwrite, model=source, dataset=data.dataset,
                                       resumable=resumable)
    if not isinstance(source, PrunedCNNForImageClassification):
        from ..vision.resnet_import import check_cnn_source

        check_cnn_source(str(source), revision=revision)  # reads no weights: a bad checkpoint is refused first
    # Then the data: a bad dataset is refused before the model is loaded.
    train_data, val_data, test_data = load_splits(data, config.val_size, config.seed, val_option="val_size (--val-size)")
    model, source_ref = _load_source(source, revision)
    return class_aware_prune(
        model, train_data, val_data, output_dir, config, test_data=test_data, source=source_ref,
        data=data_refs(data, test_data is not None), accelerator=accelerator, progress=progress,
    )


@dataclass
class TrainingResult:
    """What `train` returns: the trained model and the `training_summary.json` written beside it."""

    model: PrunedCNNForImageClassification
    summary: dict[str, Any] = field(default_factory=dict)


def _network_for_training(source: str, train_data) -> tuple[PrunedCNNForImageClassification, SourceRef]:
    """A PrunedCNN from a config JSON (fresh weights), a checkpoint or an architecture name, labelled as the data."""
    from ..modeling.pruned_cnn import PrunedCNNConfig
    from ..vision.resnet_import import load_cnn

    id2label = train_data.id2label()
    label2id = {name: i for i, name in enumerate(train_data.class_names)}
    if source.endswith(".json") and Path(source).is_file():
        config = PrunedCNNConfig.from_json_file(source)
        # The data's label set, before the head is built: a layout file describes the body, not the classes.
        config.id2label, config.label2id = id2label, label2id
        network, source_ref = PrunedCNNForImageClassification(config), SourceRef.of(source)
    else:
        network, source_ref = load_cnn(source, id2label=id2label)
    if network.config.num_labels != train_data.num_classes:
        raise HFCompressError(f"{source} has {network.config.num_labels} labels but the dataset has {train_data.num_classes} classes")
    network.config.id2label, network.config.label2id = id2label, label2id
    return network, source_ref


def _training_summary(network, config: TrainConfig, data: ImageDataConfig, source: SourceRef, history, train_data,
                      test_data) -> dict[str, Any]:
    """The `training_summary.json` of a run: provenance as in `config.compression`, the history, the test result."""
    from .. import __version__
    from ..vision.training import evaluate_accuracy

    summary = {
        "source": asdict(source), "data": [asdict(ref) for ref in data_refs(data, test_data is not None)],
        "options": config.to_dict(), "train_images": len(train_data), "train_loss": history.train_loss,
        "val_accuracy": history.eval_accuracy,
    }
    if test_data is not None:
        summary.update(test_accuracy=evaluate_accuracy(network, test_data), test_images=len(test_data))
    return {**summary, "hf_compress_version": __version__}


def train(
    source: str | Path,
    output_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    data: ImageDataConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainingResult:
    """Trains a PrunedCNN (or a converted ResNet) on an image dataset and saves it with `training_summary.json`.

    Args:
        source: an architecture name (`resnet20/32/44/56/110`, `vgg16`), a `PrunedCNNConfig` JSON file (fresh
            weights), a PrunedCNN checkpoint or a transformers ResNet checkpoint.
        config: the training settings (default `TrainConfig()`).
        data: the dataset and the split evaluated at the end (default: CIFAR-10, test split).
        overwrite: replace a non-empty `output_dir`.
    """
    import torch
    from accelerate import PartialState

    from ..vision.checkpoint import prepare_vision_output, save_checkpoint
    from ..vision.training import train_classifier
    from .regularizers import regularized_loss

    config, data = config or TrainConfig(), data or ImageDataConfig()
    config.validate()
    data.validate()
    output_dir = prepare_vision_output(output_dir, overwrite=overwrite, model=source, dataset=data.dataset)
    train_data, val_data, test_data = load_splits(data, config.val_size, config.seed, val_option="val_size (--val-size)")
    torch.manual_seed(config.seed)
    network, source_ref = _network_for_training(str(source), train_data)
    history = train_classifier(
        network, train_data, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
        weight_decay=config.weight_decay, schedule=config.schedule, eval_data=val_data, seed=config.seed,
        loss_fn=regularized_loss(config.regularizer, config.regularizer_weight), progress=progress,
    )
    summary = _training_summary(network, config, data, source_ref, history, train_data, test_data)
    network.to("cpu")
    if PartialState().is_main_process:  # one writer under `accelerate launch`
        save_checkpoint(network, output_dir, mean=train_data.mean, std=train_data.std,
                        extra_json={TRAINING_SUMMARY: summary})
    return TrainingResult(model=network, summary=summary)
