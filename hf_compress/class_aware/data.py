"""The image data of `prune` and `train`: the train split, a held-out validation split and an evaluation split."""

from __future__ import annotations

from typing import Optional

from ..data.images import ImageClassificationData
from ..data.images import load_splits as load_image_splits
from ..provenance import DataRef
from .config import ImageDataConfig

Splits = tuple[ImageClassificationData, Optional[ImageClassificationData], Optional[ImageClassificationData]]


def load_splits(data: ImageDataConfig, val_size: int, seed: int, val_option: str = "val_size") -> Splits:
    """`(train, validation, evaluation)`: validation holds out `val_size` train images (None when 0), evaluation is
    `data.eval_split` (None when unset); `val_option` is how an error names `val_size`."""
    data.validate()
    return load_image_splits(data.dataset, val_size=val_size, eval_split=data.eval_split, seed=seed, limit=data.limit,
                             eval_limit=data.eval_limit, image_column=data.image_column, label_column=data.label_column,
                             val_option=val_option)


def data_refs(data: ImageDataConfig, with_eval: bool) -> list[DataRef]:
    """The provenance of the splits: training and validation both come from the train split."""
    refs = [DataRef.of("train", data.dataset, "train")]
    if with_eval and data.eval_split:
        refs.append(DataRef.of("evaluation", data.dataset, data.eval_split))
    return refs
