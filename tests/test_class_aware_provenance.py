"""Class-aware pruning and CNN training through their entry points: the provenance record and the configs."""

from __future__ import annotations

import hashlib
import json

import datasets
import pytest
import torch
from PIL import Image

from hf_compress.class_aware import ClassAwareConfig, ImageDataConfig, TrainConfig, prune, train
from hf_compress.data.images import load_image_dataset
from hf_compress.errors import HFCompressError
from hf_compress.modeling.pruned_cnn import PrunedCNNForImageClassification, vgg_cifar_config
from hf_compress.provenance import config_from_provenance
from hf_compress.vision.checkpoint import save_checkpoint
from hf_compress.vision.counting import count_params_and_macs
from hf_compress.vision.training import predict_logits

torch.set_num_threads(2)

CLASSES = ["red", "green", "blue"]


def _write_split(folder, split: str, count: int, seed: int) -> None:
    """A parquet split of 8x8 images whose class is their bright colour channel (learnable, but any net will do)."""
    g = torch.Generator().manual_seed(seed)
    labels = [i % len(CLASSES) for i in range(count)]
    pixels = torch.randint(0, 60, (count, 8, 8, 3), generator=g, dtype=torch.uint8)
    for i, label in enumerate(labels):
        pixels[i, :, :, label] += 190
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    images = [Image.fromarray(p.numpy()) for p in pixels]
    datasets.Dataset.from_dict({"img": images, "label": labels}, features=features).to_parquet(folder / f"{split}-00000.parquet")


@pytest.fixture()
def blobs(tmp_path):
    folder = tmp_path / "blobs"
    folder.mkdir()
    _write_split(folder, "train", 90, seed=0)
    _write_split(folder, "test", 30, seed=1)
    return folder


def _folder_sha256(folder) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def test_prune_records_a_provenance_that_rebuilds_its_config(tmp_path, blobs):
    torch.manual_seed(0)
    labels = dict(enumerate(CLASSES))
    network = PrunedCNNForImageClassification(
        vgg_cifar_config([8, "M", 8], (), id2label=labels, label2id={v: k for k, v in labels.items()}, image_size=8)
    )
    save_checkpoint(network, tmp_path / "source-net")
    config = ClassAwareConfig(accuracy_floor=0.0, max_classes=3, max_fraction=0.25, max_iterations=1, retrain_epochs=1,
                              batch_size=20, images_per_class=4, val_size=30, seed=1)
    out = tmp_path / "pruned"
    result = prune(str(tmp_path / "source-net"), out, config, data=ImageDataConfig(dataset=str(blobs)), progress=False)

    text = (out / "config.json").read_text()
    assert str(tmp_path) not in text and str(blobs) not in text
    record = json.loads(text)["compression"]
    assert config_from_provenance(record) == config
    assert record["method"] == "class_aware_pruning" and "settings" not in record and "dataset" not in record
    assert record["source"] == {"model_id": "source-net", "revision": None, "gguf_file": None}
    sha = _folder_sha256(blobs)
    assert record["data"] == [{"role": "train", "name": "blobs", "split": "train", "sha256": sha},
                              {"role": "evaluation", "name": "blobs", "split": "test", "sha256": sha}]
    pruned = result.model
    counts = count_params_and_macs(pruned, (3, 8, 8))
    before = count_params_and_macs(network, (3, 8, 8))
    assert (record["params_before"], record["macs_before"]) == (before.params, before.macs)
    assert (record["params_after"], record["macs_after"]) == (counts.params, counts.macs)
    assert record["macs_after"] < record["macs_before"]
    assert record["best_iteration"] == 1 and len(record["iterations"]) == 2 and record["accuracy_split"] == "test"
    assert record["stop_reason"] == "reached 1 iterations"
    # The reported accuracy is the saved model's on the test split, recomputed here from its logits.
    test = load_image_dataset(str(blobs), "test")
    expected = (predict_logits(pruned.float(), test).argmax(-1) == test.labels).float().mean().item()
    assert record["accuracy_after"] == pytest.approx(expected)


def test_train_writes_a_summary_without_local_paths(tmp_path, blobs):
    network = vgg_cifar_config([4, "M", 4], (), num_labels=3, image_size=8)
    network.to_json_file(tmp_path / "tiny.json")
    config = TrainConfig(epochs=1, batch_size=30, val_size=15, seed=2)
    result = train(str(tmp_path / "tiny.json"), tmp_path / "base", config, data=ImageDataConfig(dataset=str(blobs)),
                   progress=False)
    text = (tmp_path / "base" / "training_summary.json").read_text()
    assert str(tmp_path) not in text
    summary = json.loads(text)
    assert summary["source"]["model_id"] == "tiny.json" and TrainConfig.from_dict(summary["options"]) == config
    assert summary["train_images"] == 75 and summary["test_images"] == 30 and len(summary["val_accuracy"]) == 1
    assert result.model.config.id2label == dict(enumerate(CLASSES))


@pytest.mark.parametrize(
    "config, message",
    [
        (ClassAwareConfig(accuracy_floor=0.5, max_classes=-1), "max_classes must be an integer >= 0, got -1"),
        (ClassAwareConfig(accuracy_floor=0.5, max_fraction=0.0), r"max_fraction must be in \(0, 1\], got 0.0"),
        (ClassAwareConfig(accuracy_floor=1.5), r"accuracy_floor must be a fraction in \[0, 1\], got 1.5"),
        (ClassAwareConfig(accuracy_floor=0.5, images_per_class=0), "images_per_class must be >= 1, got 0"),
        (ClassAwareConfig(accuracy_floor=0.5, lr=0.0), "lr must be > 0, got 0.0"),
        (ClassAwareConfig(accuracy_floor=0.5, regularizer="l2"), "regularizer must be one of .*, got 'l2'"),
        (ClassAwareConfig(accuracy_floor=0.5, target_macs=10, target_macs_reduction=0.5), "target_macs must be unset"),
        (TrainConfig(schedule="linear"), "schedule must be one of .*, got 'linear'"),
        (TrainConfig(batch_size=0), "batch_size must be an integer >= 1, got 0"),
    ],
)
def test_validate_names_the_bad_field(config, message):
    with pytest.raises(HFCompressError, match=message):
        config.validate()


def test_bad_config_is_refused_before_anything_is_read_or_written(tmp_path):
    with pytest.raises(HFCompressError, match="retrain_epochs must be an integer >= 0, got -1"):
        prune("resnet20", tmp_path / "out", ClassAwareConfig(accuracy_floor=0.5, retrain_epochs=-1),
              data=ImageDataConfig(dataset=str(tmp_path / "missing")))
    assert not (tmp_path / "out").exists()
    assert ClassAwareConfig(accuracy_floor=0.5, target_macs_reduction=0.25).mac_target(1000) == 750
    with pytest.raises(HFCompressError, match="no field"):
        ClassAwareConfig.from_dict({"accuracy_floor": 0.5, "floor": 0.5})
