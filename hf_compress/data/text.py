"""Text data for calibration and perplexity: Hub datasets or local parquet/jsonl/txt files, and the presets."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import HFCompressError
from .local import DATASET_PRESETS, find_preset

LOCAL_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text", ".csv": "csv"}


@dataclass(frozen=True)
class TextSource:
    """A text column of a dataset split: a Hub name (+ config) or local file(s)."""

    dataset: str
    config: str | None = None
    split: str = "train"
    column: str = "text"
    data_files: str | None = None

    def describe(self) -> str:
        parts = [self.dataset] + ([self.config] if self.config else []) + [self.split, self.column]
        return ":".join(parts)


def preset_hub_source(name: str) -> TextSource | None:
    """The Hub split a text preset stands for (what a card or provenance names), or None if `name` is no preset."""
    preset = find_preset(name, "text")
    if preset is None:
        return None
    return TextSource(preset.hub_id, preset.config, preset.split, preset.column, preset.data_files)


# name -> (Hub source, local file under data_root()): a view of the text entries of `DATASET_PRESETS`, for callers
# that index it; new code uses `preset_hub_source` / `find_preset`.
PRESETS: dict[str, tuple[TextSource, str]] = {
    name: (preset_hub_source(name), preset.local_file)
    for name, preset in DATASET_PRESETS.items()
    if preset.modality == "text"
}


def resolve_text_source(dataset: str, config: str | None = None, split: str | None = None,
                        column: str | None = None) -> TextSource:
    """Turns a preset name, a local file/folder or a Hub name into a `TextSource`.

    Presets read the local copy under `data_root()` when it exists (always the case offline) and the Hub otherwise.
    """
    preset = find_preset(dataset, "text")
    if preset is None:
        return TextSource(dataset, config, split or "train", column or "text")
    if preset.local_path().is_file():
        return TextSource(str(preset.local_path()), None, "train", column or preset.column)
    return TextSource(preset.hub_id, config or preset.config, split or preset.split, column or preset.column,
                      preset.data_files)


def _error_line(err: BaseException) -> str:
    """The first line of the innermost cause of `err` (datasets wraps the reader's own error in a generic one)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return (str(err).strip().splitlines() or [err.__class__.__name__])[0]


def looks_like_path(name: str) -> bool:
    """Whether `name` can only mean a local file or folder (a data-file suffix, or a path prefix), never a Hub name."""
    return name.startswith(("/", ".", "~")) or Path(name).suffix in LOCAL_BUILDERS


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silences datasets' progress bars and error logs while it reads a local file: the reason a file cannot be
    read reaches the user as one line of ours, not as datasets' log lines above it."""
    import datasets
    from datasets.utils import logging as ds_logging

    verbosity, bars_were_off = ds_logging.get_verbosity(), datasets.are_progress_bars_disabled()
    ds_logging.set_verbosity(ds_logging.CRITICAL + 10)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _check_local_file(path: Path) -> None:
    """Refuses an empty file, and a parquet file that is no parquet or has no rows, before datasets reads it."""
    if path.stat().st_size == 0:
        raise HFCompressError(f"{path} is empty.")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not parquet
            raise HFCompressError(f"{path} is not a readable parquet file ({_error_line(err)}).") from None
        if rows == 0:
            raise HFCompressError(f"{path} has no rows.")


def _load_local(path: Path):
    """The rows of a local file or of the data files of a folder, as a `datasets.Dataset`."""
    import datasets

    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS) if path.is_dir() else [path]
    if not files:
        raise HFCompressError(f"no parquet/jsonl/json/txt/csv files in {path}.")
    builder = LOCAL_BUILDERS.get(files[0].suffix)
    if builder is None:
        raise HFCompressError(f"unsupported data file {files[0]}; use one of {sorted(LOCAL_BUILDERS)}.")
    for file in files:
        _check_local_file(file)
    with _quiet_datasets():
        try:
            return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
        except Exception as err:  # datasets raises its own errors and the reader's (pyarrow, json, pandas)
            raise HFCompressError(f"cannot read {path} as {builder} ({_error_line(err)}).") from None


def _load_hub(source: TextSource):
    """The split of a Hub dataset (or of datasets' local cache, offline) as a `datasets.Dataset`."""
    import datasets

    if looks_like_path(source.dataset):
        raise HFCompressError(f"file {source.dataset} does not exist.")
    try:
        return datasets.load_dataset(source.dataset, source.config, split=source.split, data_files=source.data_files)
    except Exception as err:  # datasets raises many types for a missing or unreachable dataset
        offline = datasets.config.HF_HUB_OFFLINE
        checked = "the local dataset cache (offline)" if offline else "the Hub"
        raise HFCompressError(f"{source.dataset!r} is no preset ({', '.join(PRESETS)}), no local file, and "
                              f"{checked} could not load it: {_error_line(err)}") from None


def load_texts(source: TextSource) -> list[str]:
    """The rows of `source.column`, in order; a source without text is refused in one line that names it."""
    path = Path(source.dataset)
    table = _load_local(path) if path.exists() else _load_hub(source)
    if source.column not in table.column_names:
        raise HFCompressError(
            f"dataset {source.describe()} has no column {source.column!r}; its columns are {table.column_names}."
        )
    feature = table.features[source.column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        texts = [name for name, f in table.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        raise HFCompressError(f"column {source.column!r} of {source.dataset} holds {feature}, not text; "
                              f"its text columns are {texts}.")
    if len(table) == 0:
        raise HFCompressError(f"dataset {source.describe()} has no rows.")
    texts = [text if text is not None else "" for text in table[source.column]]
    if not any(text.strip() for text in texts):
        raise HFCompressError(f"column {source.column!r} of {source.dataset} holds no text (every row is empty).")
    return texts


def load_text_option(option: str, dataset: str, config: str | None = None, split: str | None = None,
                     column: str | None = None) -> list[str]:
    """The rows that the option `option` (e.g. `--calib-dataset`) names; what cannot give text is refused in one
    line that starts with the option. Called before any model loads, so a bad dataset costs no load."""
    try:
        return load_texts(resolve_text_source(dataset, config, split, column))
    except HFCompressError as err:
        raise HFCompressError(f"{option}: {err}") from None


def tokenize_joined(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """Rows joined with a blank line and tokenized once, without special tokens (the protocol of BENCHMARKS.md)."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids


def calibration_batch(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    *,
    samples: int,
    seq_len: int,
    seed: int,
) -> torch.Tensor:
    """`samples` non-overlapping chunks of `seq_len` tokens, drawn with `torch.manual_seed(seed)` + `randperm`."""
    if samples < 1 or seq_len < 1:
        raise HFCompressError(f"calibration needs samples >= 1 and seq_len >= 1; got {samples} x {seq_len}.")
    ids = tokenize_joined(tokenizer, texts)
    num_chunks = ids.numel() // seq_len
    if num_chunks < samples:
        raise HFCompressError(
            f"the calibration text has {ids.numel()} tokens: {num_chunks} chunks of {seq_len}, fewer than the "
            f"{samples} samples asked for; lower --calib-samples or --calib-seq-len, or give more text."
        )
    chunks = ids[: num_chunks * seq_len].view(num_chunks, seq_len)
    torch.manual_seed(seed)
    order = torch.randperm(num_chunks)
    return chunks[order[:samples]].clone()
