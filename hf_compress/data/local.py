"""Local stand-ins for Hub datasets: the one place every loader asks where they live, and the one preset registry.

A preset names a Hub dataset split (and column, for text) together with the file or folder under `data_root()` that
holds the same rows, so every command runs offline when the local copy is there and reads the Hub otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def data_root() -> Path:
    """`$HF_COMPRESS_DATA` when set, else `shared/data` beside the repository of a development checkout.

    Read at call time, so setting the variable after import takes effect.
    """
    env = os.environ.get("HF_COMPRESS_DATA")
    if env:
        return Path(env)
    # hf_compress/data/local.py -> the folder that holds the checkout
    return Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass(frozen=True)
class DatasetPreset:
    """A dataset known by a short name (`--dataset wikitext2`, `--dataset cifar10`).

    Args:
        name: the short name.
        hub_id: the Hub dataset the preset stands for.
        config: its configuration, if it has several.
        split: the split a text preset reads (image presets take the split from the caller).
        column: the text column of a text preset.
        local_file: the file (text) or folder (images) under `data_root()` holding the same rows.
        data_files: the Hub files to read, where the dataset is split into many shards (C4).
        modality: `"text"` or `"image"`: which loader accepts the name.
    """

    name: str
    hub_id: str
    config: str | None = None
    split: str | None = None
    column: str | None = None
    local_file: str = ""
    data_files: str | None = None
    modality: str = "text"

    def local_path(self) -> Path:
        """Where the local copy lives now (`data_root()` is read at each call)."""
        return data_root() / self.local_file


DATASET_PRESETS: dict[str, DatasetPreset] = {
    preset.name: preset
    for preset in (
        DatasetPreset("wikitext2", "wikitext", "wikitext-2-raw-v1", "test", "text",
                      "wikitext-2-raw-v1/test-00000-of-00001.parquet"),
        DatasetPreset("ptb", "ptb_text_only", None, "test", "sentence", "ptb_text_only/test-00000-of-00001.parquet"),
        DatasetPreset("c4", "allenai/c4", None, "validation", "text", "c4/validation-00000-of-00001.parquet",
                      data_files="en/c4-validation.00000-of-00008.json.gz"),
        # Calibration text: the first shard of C4 train (never the validation documents used for evaluation).
        DatasetPreset("c4-calibration", "allenai/c4", None, "train", "text", "c4/calibration-00000-of-00001.parquet",
                      data_files="en/c4-train.00000-of-01024.json.gz"),
        DatasetPreset("cifar10", "uoft-cs/cifar10", local_file="cifar10", modality="image"),
    )
}


def find_preset(name: str, modality: str) -> DatasetPreset | None:
    """The preset called `name` that the `modality` loader accepts, or None (a path or Hub name then)."""
    preset = DATASET_PRESETS.get(name)
    return preset if preset is not None and preset.modality == modality else None
