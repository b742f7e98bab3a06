"""Tests of hf_compress.data.images: loading, labels, splits, augmentation, normalisation."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from hf_compress.errors import HFCompressError
from hf_compress.data.images import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    LOCAL_DATA_DIR,
    ImageClassificationData,
    augment_images,
    load_image_dataset,
    train_val_split,
)

CIFAR_TEST = LOCAL_DATA_DIR / "cifar10" / "test-00000-of-00001.parquet"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_parquet(path, images: list[np.ndarray], labels: list[int] | None, label_name: str = "label") -> None:
    columns = {"image": [{"bytes": _png(a), "path": None} for a in images]}
    if labels is not None:
        columns[label_name] = labels
    pq.write_table(pa.table(columns), path)


@pytest.mark.skipif(not CIFAR_TEST.exists(), reason="local CIFAR-10 copy missing")
def test_cifar10_alias_decodes_the_rows_it_selects():
    data = load_image_dataset("cifar10", "test", limit=50, seed=3)
    assert data.images.shape == (50, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.class_names[:3] == ["airplane", "automobile", "bird"] and data.num_classes == 10
    # Independent read of the same rows with pyarrow + PIL.
    keep = np.sort(np.random.default_rng(3).choice(10000, size=50, replace=False))
    table = pq.read_table(CIFAR_TEST).take(pa.array(keep))
    expected_labels = table.column("label").to_pylist()
    assert data.labels.tolist() == expected_labels
    first = np.array(Image.open(io.BytesIO(table.column("img")[0].as_py()["bytes"])).convert("RGB"))
    assert torch.equal(data.images[0], torch.from_numpy(first).permute(2, 0, 1))


def test_local_parquet_folder_with_plain_int_labels(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(4)]
    (tmp_path / "data").mkdir()
    _write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", images, [2, 0, 1, 2])
    data = load_image_dataset(str(tmp_path / "data"), "train")
    assert data.class_names == ["0", "1", "2"]
    assert data.labels.tolist() == [2, 0, 1, 2]
    assert torch.equal(data.images[1], torch.from_numpy(images[1]).permute(2, 0, 1))
    with pytest.raises(HFCompressError, match="no parquet file for split 'test'"):
        load_image_dataset(str(tmp_path / "data"), "test")


def test_missing_label_column_and_bad_labels_are_named(tmp_path):
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    _write_parquet(tmp_path / "nolabel.parquet", [image, image], None)
    with pytest.raises(HFCompressError, match="no label column"):
        load_image_dataset(str(tmp_path / "nolabel.parquet"))
    _write_parquet(tmp_path / "neg.parquet", [image, image], [0, -1])
    with pytest.raises(HFCompressError, match="negative labels"):
        load_image_dataset(str(tmp_path / "neg.parquet"))
    with pytest.raises(HFCompressError, match="column 'y' not found"):
        load_image_dataset(str(tmp_path / "neg.parquet"), label_column="y")
    with pytest.raises(HFCompressError, match=r"labels must lie in \[0, 1\]"):
        ImageClassificationData(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]), ["a", "b"])
    with pytest.raises(HFCompressError, match="does not exist"):
        load_image_dataset(str(tmp_path / "missing.parquet"))


def test_train_val_split_follows_the_protocol():
    data = ImageClassificationData(torch.zeros(100, 3, 2, 2, dtype=torch.uint8), torch.arange(100) % 10, [str(i) for i in range(10)])
    data.images[:, 0, 0, 0] = torch.arange(100, dtype=torch.uint8)  # identify each example
    train, val = train_val_split(data, n_val=30, seed=2023)
    expected_val = torch.randperm(100, generator=torch.Generator().manual_seed(2023))[:30]
    assert val.images[:, 0, 0, 0].long().tolist() == expected_val.tolist()
    assert len(train) == 70
    assert sorted(train.images[:, 0, 0, 0].tolist() + val.images[:, 0, 0, 0].tolist()) == list(range(100))
    with pytest.raises(HFCompressError, match="n_val"):
        train_val_split(data, n_val=100)


def test_augmentation_is_a_padded_crop_with_optional_flip():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = augment_images(images, padding=2, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for i in range(16):
        matches = [
            (dy, dx, flip)
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
            if torch.equal(out[i], (lambda c: c.flip(2) if flip else c)(padded[i, :, dy : dy + 8, dx : dx + 8]))
        ]
        assert len(matches) == 1
        flips += matches[0][2]
    assert 0 < flips < 16  # both branches are taken
    assert torch.equal(augment_images(images, padding=0, flip=False), images)


def test_batches_normalise_and_cover_every_example_once():
    data = ImageClassificationData(torch.randint(0, 256, (10, 3, 2, 2), dtype=torch.uint8), torch.arange(10) % 3, ["a", "b", "c"])
    batches = list(data.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    # Recover the visiting order from the normalised pixels and check the values by hand.
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    raw = ((images * std + mean) * 255).round().to(torch.uint8)
    order = [next(j for j in range(10) if torch.equal(raw[i], data.images[j])) for i in range(10)]
    assert sorted(order) == list(range(10))
    assert torch.allclose(images, (data.images[order].float() / 255 - mean) / std)
    assert labels.tolist() == data.labels[order].tolist()
    # Two shards of the same order split it without overlap.
    shard0 = torch.cat([b[1] for b in data.batches(3, shard=(0, 2))])
    shard1 = torch.cat([b[1] for b in data.batches(3, shard=(1, 2))])
    assert shard0.tolist() == data.labels[0::2].tolist() and shard1.tolist() == data.labels[1::2].tolist()


def test_hf_compress_data_set_after_import_redirects_text_and_image_presets(tmp_path, monkeypatch):
    from hf_compress.data.local import DATASET_PRESETS, data_root
    from hf_compress.data.text import load_texts, resolve_text_source

    (tmp_path / "wikitext-2-raw-v1").mkdir()
    wiki = tmp_path / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet"
    pq.write_table(pa.table({"text": ["first line", "", "second line"]}), wiki)
    (tmp_path / "cifar10").mkdir()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (3, 3, 3), dtype=np.uint8) for _ in range(3)]
    _write_parquet(tmp_path / "cifar10" / "test-00000-of-00001.parquet", images, [1, 0, 1])

    monkeypatch.setenv("HF_COMPRESS_DATA", str(tmp_path))  # after every module above was imported
    assert data_root() == tmp_path and DATASET_PRESETS["wikitext2"].local_path() == wiki
    source = resolve_text_source("wikitext2")
    assert (source.dataset, source.column) == (str(wiki), "text")
    assert load_texts(source) == ["first line", "", "second line"]
    data = load_image_dataset("cifar10", "test")
    assert data.labels.tolist() == [1, 0, 1] and data.source == "cifar10:test"
    assert torch.equal(data.images[2], torch.from_numpy(images[2]).permute(2, 0, 1))
    from hf_compress.data.images import LOCAL_DATA_DIR as redirected

    assert redirected == tmp_path
    # Without the local copies a preset names its Hub dataset.
    monkeypatch.setenv("HF_COMPRESS_DATA", str(tmp_path / "empty"))
    source = resolve_text_source("wikitext2")
    assert (source.dataset, source.config, source.split) == ("wikitext", "wikitext-2-raw-v1", "test")
