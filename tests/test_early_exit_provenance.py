"""Early exit's provenance record: the config round trip, one `thresholds` key, no local path; config validation."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification

from hf_compress.early_exit import EarlyExitConfig, EarlyExitResult, add_early_exits
from hf_compress.errors import HFCompressError
from hf_compress.provenance import config_from_provenance

torch.set_num_threads(1)
CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def _tiny_resnet(folder: Path, num_labels: int) -> Path:
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="basic", num_labels=num_labels)
    ResNetForImageClassification(config).save_pretrained(folder)
    return folder


def _synthetic_dataset(folder: Path, sizes: dict[str, int], num_labels: int = 3) -> Path:
    """Parquet splits of random 16x16 images with integer labels, as `load_image_dataset` reads a local folder."""
    import pandas as pd
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in sizes.items():
        rows = []
        for index in range(n):
            buffer = BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
            rows.append({"img": {"bytes": buffer.getvalue(), "path": None}, "label": index % num_labels})
        pd.DataFrame(rows).to_parquet(folder / f"{split}-00000.parquet")
    return folder


def _folder_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        digest.update(file.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("rule", ["class_exclusion", "confidence"])
def test_record_on_local_data(tmp_path, rule):
    data = _synthetic_dataset(tmp_path / "shapes", {"train": 60, "test": 30})
    source = _tiny_resnet(tmp_path / "resnet", num_labels=3)
    config = EarlyExitConfig(dataset=str(data), exit_rule=rule, epochs=1, batch_size=20, n_val=20, step=0.25, tolerance=0.5)
    result = add_early_exits(source, tmp_path / "out", config, progress=False)
    assert isinstance(result, EarlyExitResult)

    text = (tmp_path / "out" / "config.json").read_text()
    assert str(tmp_path) not in text  # neither the data folder nor the source folder is recorded by path
    saved = json.loads(text)
    record = saved["compression"]
    assert record == result.provenance
    assert record["method"] == {"class_exclusion": "class_exclusion_early_exit", "confidence": "confidence_early_exit"}[rule]
    assert record["thresholds"] == saved["exit_thresholds"] == result.thresholds
    assert "betas" not in record and "confidence_thresholds" not in record
    assert record["source"] == {"model_id": "resnet", "revision": None, "gguf_file": None}
    assert record["data"] == [
        {"role": "train", "name": "shapes", "split": "train", "sha256": _folder_sha256(data)},
        {"role": "evaluation", "name": "shapes", "split": "test", "sha256": _folder_sha256(data)},
    ]
    # The resolved config: pool size 2 and the model's default positions (middle of stage 2; end of stage 1).
    assert result.config.exit_positions == saved["exit_positions"] == ["stage1", "stage2.1"]
    assert result.config.exit_pool_size == saved["exit_pool_size"] == 2
    assert config_from_provenance(record) == dataclasses.replace(result.config, dataset="shapes")
    assert record["dataset"] == "shapes:test" and record["exit_rule"] == rule
    assert record["validation"]["samples"] == 20 and record["training"]["train_samples"] == 40
    assert sorted(record["exit_histogram"]) == sorted(["stage1", "stage2.1", "final"])
    assert sum(record["exit_histogram"].values()) == pytest.approx(1.0)
    report = json.loads((tmp_path / "out" / "exit_report.json").read_text())
    assert report["mean_macs"] == record["mean_macs"] and report["samples"] == 30


@pytest.mark.skipif(not CIFAR.is_dir(), reason="needs ../shared/data/cifar10")
def test_record_round_trips_config_on_cifar(tmp_path):
    source = _tiny_resnet(tmp_path / "resnet", num_labels=10)
    config = EarlyExitConfig(exit_positions=["stage2.1"], exit_pool_size=1, epochs=0, n_val=50, train_limit=150,
                             test_split=None, step=0.1, tolerance=0.05)
    result = add_early_exits(source, tmp_path / "out", config, progress=False)
    record = json.loads((tmp_path / "out" / "config.json").read_text())["compression"]
    assert config_from_provenance(record) == result.config == config.resolve()
    assert record["options"]["exit_pool_size"] == 1 and record["data"] == [
        {"role": "train", "name": "cifar10", "split": "train", "sha256": None}
    ]
    # Without a test split the figures are the validation ones.
    assert record["dataset"] == "cifar10:validation" and record["exit_histogram"] is None
    assert record["mean_macs"] == record["validation"]["mean_macs"]


def test_resolve_fills_pool_size_only():
    assert EarlyExitConfig().resolve().exit_pool_size == 2
    assert EarlyExitConfig().resolve().exit_positions is None
    assert EarlyExitConfig(exit_pool_size=3).resolve().exit_pool_size == 3
    model_config = type("C", (), {"exit_positions": ["stage1"], "exit_pool_size": 4})()
    assert EarlyExitConfig().resolve(None, model_config).to_dict() == {
        **EarlyExitConfig().to_dict(), "exit_positions": ["stage1"], "exit_pool_size": 4
    }


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("tolerance", 1.0, r"tolerance \(--tolerance\) must be in \[0, 1\)"),
        ("tolerance", -0.1, r"tolerance \(--tolerance\) must be in \[0, 1\)"),
        ("step", 0.0, r"step \(--step\).* must be in \(0, 1\)"),
        ("step", 1.0, r"step \(--step\).* must be in \(0, 1\)"),
        ("exit_rule", "entropy", r"exit_rule \(--rule\) must be one of \['class_exclusion', 'confidence'\]"),
        ("exit_pool_size", 0, r"exit_pool_size \(--exit-pool-size\) must be >= 1, got 0"),
        ("epochs", -1, r"epochs \(--epochs\) must be >= 0, got -1"),
        ("lr", 0.0, r"lr \(--lr\) must be > 0, got 0.0"),
        ("batch_size", 0, r"batch_size \(--batch-size\) must be >= 1, got 0"),
        ("n_val", 0, r"n_val \(--n-val\) must be >= 1, got 0"),
    ],
)
def test_validate_names_the_field(field, value, message):
    EarlyExitConfig().validate()
    with pytest.raises(HFCompressError, match=message):
        EarlyExitConfig(**{field: value}).validate()


@pytest.mark.parametrize("args, flag", [(["--exit-pool-size", "0"], "--exit-pool-size"), (["--step", "1.5"], "--step")])
def test_cli_refuses_before_loading_anything(tmp_path, monkeypatch, capsys, args, flag):
    from hf_compress.cli import main

    # Neither the model nor the dataset exists: only validation running first can name the flag.
    missing = str(tmp_path / "missing")
    monkeypatch.setattr(sys, "argv", ["hf-compress", "early-exit", missing, str(tmp_path / "o"), "--dataset", missing, *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and flag in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
