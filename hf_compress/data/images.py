"""Image classification data held as tensors, so training can keep it on the accelerator.

`load_image_dataset` reads any image classification dataset that `datasets` can load (a Hub name, a
local parquet file or folder, or the alias `cifar10`), decodes every image once into a uint8 tensor
`[N, 3, H, W]` and returns it with int64 labels and the class names. Augmentation (random crop with
padding, horizontal flip) and normalisation then run batched on whatever device the tensors live on.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HFCompressError, error_line
from .local import data_root, find_preset

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_IMAGE_COLUMN_NAMES = ("img", "image", "images", "pixel_values")
_LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "target")


def __getattr__(name: str):
    # `LOCAL_DATA_DIR` (the local data folder, as the tests' skip conditions name it) is `data_root()` at the
    # moment it is looked up, so setting HF_COMPRESS_DATA after import redirects it as it does the loaders.
    if name == "LOCAL_DATA_DIR":
        return data_root()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class ImageClassificationData:
    """Decoded images and labels of one split.

    Args:
        images: uint8 tensor `[N, C, H, W]`.
        labels: int64 tensor `[N]`, each in `[0, len(class_names))`.
        class_names: name of each class index.
        mean, std: per-channel normalisation applied by `normalize` (in units of the 0-1 pixel range).
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise HFCompressError(f"images must be a uint8 tensor [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise HFCompressError(f"labels must have shape [{self.images.shape[0]}], got {tuple(self.labels.shape)}")
        self.labels = self.labels.long()
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)):
            raise HFCompressError(
                f"labels must lie in [0, {len(self.class_names) - 1}] ({len(self.class_names)} classes), "
                f"found values from {int(self.labels.min())} to {int(self.labels.max())}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.class_names))

    def to(self, device: torch.device | str) -> "ImageClassificationData":
        """Returns a copy whose tensors live on `device` (still uint8, so CIFAR-10 train takes 150 MB)."""
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def subset(self, indices: torch.Tensor | Sequence[int]) -> "ImageClassificationData":
        """Returns the examples at `indices`, in that order."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        return replace(self, images=self.images[index], labels=self.labels[index])

    def of_class(self, label: int, limit: int | None = None) -> "ImageClassificationData":
        """Returns the first `limit` examples (all if None) whose label is `label`."""
        index = torch.nonzero(self.labels == label).flatten()
        return self.subset(index[:limit] if limit is not None else index)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float32 normalised with this dataset's mean and std."""
        return normalize(images, self.mean, self.std)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields `(normalised float images, labels)` batches on the data's device.

        Args:
            shuffle: visit examples in a random order drawn from `generator`.
            augment: apply `augment_images` (random crop with padding 4, horizontal flip).
            shard: `(index, count)`: this process takes every `count`-th batch element of the global
                order (data parallel training draws the same order on every process).
        """
        if shuffle:
            order = torch.randperm(len(self), generator=generator).to(self.device)
        else:
            order = torch.arange(len(self), device=self.device)
        rank, world = shard
        order = order[rank::world]
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            images = self.images[index]
            if augment:
                images = augment_images(images, generator=generator)
            yield self.normalize(images), self.labels[index]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 `[N, C, H, W]` -> float32 `(x / 255 - mean) / std`."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


def augment_images(
    images: torch.Tensor, *, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop of the original size from the zero-padded image, then a random horizontal flip.

    Runs batched on the images' device (one gather, no Python loop over examples). Random numbers are
    drawn on the CPU from `generator` so a seed gives the same augmentation on any device.
    """
    n, _, h, w = images.shape
    device = images.device
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(device)
        rows = (dy[:, None] + torch.arange(h, device=device)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=device)[None, :])[:, None, None, :]
        batch = torch.arange(n, device=device)[:, None, None, None]
        channels = torch.arange(images.shape[1], device=device)[None, :, None, None]
        images = padded[batch, channels, rows, cols]
    if flip:
        mirror = (torch.rand(n, generator=generator) < 0.5).to(device)
        images = torch.where(mirror[:, None, None, None], images.flip(3), images)
    return images


# The protocol's hold-out seed: the validation images do not move with a run's own seed.
VALIDATION_SEED = 2023


def train_val_split(
    data: ImageClassificationData, n_val: int = 5000, seed: int = VALIDATION_SEED
) -> tuple[ImageClassificationData, ImageClassificationData]:
    """Holds out `n_val` examples chosen by `torch.randperm` under `seed` (the benchmark protocol).

    Returns `(train, val)`; the first `n_val` indices of the permutation form the validation split.
    """
    if not 0 < n_val < len(data):
        raise HFCompressError(f"n_val must be between 1 and {len(data) - 1} (dataset size {len(data)}), got {n_val}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(order[n_val:]), data.subset(order[:n_val])


def resolve_dataset(name_or_path: str, split: str):
    """Loads split `split` of a local parquet file/folder, an image preset (`cifar10`), or a Hub dataset as a
    `datasets.Dataset`; what cannot be read, or holds no rows, is refused in one line naming the dataset."""
    import datasets

    preset = find_preset(name_or_path, "image")
    if preset is not None:
        name_or_path = str(preset.local_path()) if preset.local_path().is_dir() else preset.hub_id
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix != ".parquet":
        raise HFCompressError(f"local dataset files must be parquet, got {path}")
    if not (path.is_file() or path.is_dir()):
        if path.suffix == ".parquet" or name_or_path.startswith((".", "/", "~")):
            raise HFCompressError(f"dataset path {name_or_path} does not exist")
        try:
            return datasets.load_dataset(name_or_path, split=split)
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
            raise HFCompressError(f"dataset {name_or_path} is no local file or folder, and the Hub dataset could not "
                                  f"be loaded ({error_line(err)})") from None
    files = [str(path)] if path.is_file() else [str(f) for f in _split_files(path, split)]
    try:
        if _parquet_rows(files) == 0:
            raise HFCompressError(f"dataset {name_or_path} has no rows in split {split!r}")
        # The conversion of local files takes a moment: its progress bars would only crowd the output.
        with _quiet_datasets():
            # parquet files hold one split, which `datasets` calls "train" whatever it is
            return datasets.load_dataset("parquet", data_files=files, split="train")
    except HFCompressError:
        raise
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        raise HFCompressError(f"cannot read the parquet data {name_or_path} ({error_line(err)})") from None


def _parquet_rows(files: Sequence[str]) -> int:
    """The number of rows of parquet files, from their footers (a file that is no parquet raises ArrowInvalid)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(file).metadata.num_rows for file in files)


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """`datasets` without progress bars inside the block, as they were after it."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _split_files(folder: Path, split: str) -> list[Path]:
    """The parquet files of `split` in a local dataset folder (`split-*.parquet`, `split/*.parquet` or one level down)."""
    files = sorted(folder.glob(f"{split}-*.parquet")) or sorted(folder.glob(f"{split}/*.parquet"))
    files = files or sorted(folder.glob(f"*/{split}-*.parquet"))
    if not files:
        found = sorted(p.name for p in folder.rglob("*.parquet"))
        raise HFCompressError(f"no parquet file for split {split!r} in {folder} (found: {found or 'none'})")
    return files


def _pick_column(dataset, given: str | None, feature_type: type, names: Sequence[str], what: str, source: str) -> str:
    if given is not None:
        if given not in dataset.column_names:
            raise HFCompressError(f"{what} column {given!r} not found; the dataset has columns {dataset.column_names}")
        return given
    for name, feature in dataset.features.items():
        if isinstance(feature, feature_type):
            return name
    for name in names:
        if name in dataset.column_names:
            return name
    # No "--image-column" hint: early-exit and exit-report have no such option.
    raise HFCompressError(
        f"dataset {source} has no {what} column (looked for a feature of type {feature_type.__name__} or one of {list(names)}); "
        f"its columns are {dataset.column_names}"
    )


def _decode(item, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    if isinstance(item, dict):
        image = Image.open(io.BytesIO(item["bytes"])) if item.get("bytes") else Image.open(item["path"])
    else:
        image = item
    image = image.convert("RGB")
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def load_image_dataset(
    name_or_path: str,
    split: str = "train",
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    image_size: int | tuple[int, int] | None = None,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> ImageClassificationData:
    """Loads and decodes an image classification split.

    Args:
        name_or_path: a Hub dataset (`uoft-cs/cifar10`), a local parquet file, a folder holding
            `<split>-*.parquet` files, or the preset `cifar10` (its copy under `data_root()`, i.e.
            `$HF_COMPRESS_DATA/cifar10/`, when present, else the Hub dataset).
        split: split name; ignored for a single parquet file.
        image_column, label_column: column names; found from the features (`Image`, `ClassLabel`) or the
            usual names when not given.
        limit: keep this many examples, drawn at random with `seed` and kept in dataset order.
        image_size: resize every image to this size; without it all images must already share one size.
        mean, std: normalisation stored with the data.

    Returns:
        An `ImageClassificationData` on the CPU.
    """
    import datasets

    dataset = resolve_dataset(name_or_path, split)
    if len(dataset) == 0:  # a Hub split; local files are checked from their footers
        raise HFCompressError(f"dataset {name_or_path} has no rows in split {split!r}")
    image_col = _pick_column(dataset, image_column, datasets.Image, _IMAGE_COLUMN_NAMES, "image", name_or_path)
    label_col = _pick_column(dataset, label_column, datasets.ClassLabel, _LABEL_COLUMN_NAMES, "label", name_or_path)
    label_feature = dataset.features[label_col]
    if limit is not None and limit < len(dataset):
        if limit <= 0:
            raise HFCompressError(f"limit must be positive, got {limit}")
        keep = np.sort(np.random.default_rng(seed).choice(len(dataset), size=limit, replace=False))
        dataset = dataset.select(keep.tolist())
    if isinstance(dataset.features[image_col], datasets.Image):
        # Decoding ourselves from the raw bytes is several times faster than going through the feature.
        dataset = dataset.cast_column(image_col, datasets.Image(decode=False))
    labels, class_names = _labels_and_classes(dataset[label_col], label_feature, label_col)
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    return ImageClassificationData(
        images=_decode_all(dataset[image_col], size), labels=labels, class_names=class_names, mean=tuple(mean),
        std=tuple(std), source=f"{name_or_path}:{split}",
    )


def _labels_and_classes(values, feature, column: str) -> tuple[torch.Tensor, list[str]]:
    """int64 labels and class names: a `ClassLabel`'s names, else "0" .. str(max label)."""
    import datasets

    labels = torch.tensor(np.asarray(values), dtype=torch.long)
    if isinstance(feature, datasets.ClassLabel):
        class_names = list(feature.names)
    else:
        if labels.numel() and labels.min() < 0:
            raise HFCompressError(f"label column {column!r} has negative labels (min {int(labels.min())}); unlabeled split?")
        class_names = [str(i) for i in range(int(labels.max()) + 1 if labels.numel() else 0)]
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise HFCompressError(
            f"label column {column!r} has values from {int(labels.min())} to {int(labels.max())}, "
            f"outside the {len(class_names)} classes [0, {len(class_names) - 1}]"
        )
    return labels, class_names


def _decode_all(items, size: tuple[int, int] | None) -> torch.Tensor:
    """uint8 `[N, 3, H, W]` of the encoded images; they must share one size unless `size` resizes them."""
    arrays = [_decode(item, size) for item in items]
    if not arrays:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise HFCompressError(f"images have different sizes {sorted(shapes)[:4]}...; pass image_size to resize them")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_splits(
    dataset: str,
    *,
    val_size: int,
    eval_split: str | None,
    seed: int = 0,
    limit: int | None = None,
    eval_limit: int | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    val_option: str = "val_size",
) -> tuple[ImageClassificationData, ImageClassificationData | None, ImageClassificationData | None]:
    """`(train, validation, evaluation)` of a dataset, as every vision method uses them.

    Validation holds out `val_size` train images with `VALIDATION_SEED` (None when 0); evaluation is `eval_split`
    (None when unset) and must have the train split's classes. `limit`/`eval_limit` draw random subsets with `seed`.
    `val_option` is how an error names `val_size` (the option of the calling command).
    """
    columns = {"image_column": image_column, "label_column": label_column}
    train = load_image_dataset(dataset, "train", limit=limit, seed=seed, **columns)
    val = None
    if val_size > 0:
        if val_size >= len(train):
            raise HFCompressError(
                f"{val_option} must be smaller than the train split ({len(train)} images) to leave training images, "
                f"got {val_size}"
            )
        train, val = train_val_split(train, n_val=val_size)
    test = None
    if eval_split:
        test = load_image_dataset(dataset, eval_split, limit=eval_limit, seed=seed, **columns)
        if test.class_names != train.class_names:
            raise HFCompressError(
                f"eval_split {eval_split!r} has classes {test.class_names}, the train split {train.class_names}"
            )
    return train, val, test
