"""Text data for calibration and perplexity: Hub datasets or local parquet/jsonl/txt files, and the presets."""

from __future__ import annotations

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


def load_texts(source: TextSource) -> list[str]:
    """The rows of `source.column`, in order."""
    import datasets

    path = Path(source.dataset)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS) if path.is_dir() else [path]
        if not files:
            raise HFCompressError(f"no parquet/jsonl/json/txt/csv files in {path}.")
        builder = LOCAL_BUILDERS.get(files[0].suffix)
        if builder is None:
            raise HFCompressError(f"unsupported data file {files[0]}; use one of {sorted(LOCAL_BUILDERS)}.")
        table = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    else:
        try:
            table = datasets.load_dataset(source.dataset, source.config, split=source.split, data_files=source.data_files)
        except Exception as err:  # datasets raises many types for a missing or unreachable dataset
            raise HFCompressError(f"cannot load dataset {source.describe()}: {err}") from err
    if source.column not in table.column_names:
        raise HFCompressError(
            f"dataset {source.describe()} has no column {source.column!r}; its columns are {table.column_names}."
        )
    return [text if text is not None else "" for text in table[source.column]]


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
