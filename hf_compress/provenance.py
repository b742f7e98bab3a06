"""The provenance record every method writes into `config.compression` (llm-compressor's recipe beside the model).

One layout for every method:

- `method`: the method's name;
- `options`: the method config's `to_dict()` (`config_from_provenance` rebuilds an equal config from it);
- `source`: the model it started from (`model_id`, `revision`, `gguf_file`);
- `data`: the data it used, each by dataset name and split, or by file name with the file's sha256, never by a path
  of the converting machine (the record is pushed to the Hub with the model);
- the figures the method measured (ratios, parameter and MAC counts, accuracies, ...), as top-level keys;
- `hf_compress_version`.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import MethodConfig
from .errors import HFCompressError

# method name -> "module:class" of its config, for `config_from_provenance`.
METHOD_CONFIGS = {
    "basis_sharing": "hf_compress.basis_sharing.config:BasisSharingConfig",
    "class_aware_pruning": "hf_compress.class_aware.config:ClassAwareConfig",
    "class_exclusion_early_exit": "hf_compress.early_exit.config:EarlyExitConfig",
    "confidence_early_exit": "hf_compress.early_exit.config:EarlyExitConfig",
}


@dataclass(frozen=True)
class SourceRef:
    """The checkpoint a method started from: a Hub id (or a name the user gave), its revision, a GGUF file name."""

    model_id: str | None
    revision: str | None = None
    gguf_file: str | None = None

    @classmethod
    def of(cls, model: str | Path | None, revision: str | None = None, gguf_file: str | None = None) -> "SourceRef":
        """A local path is recorded by its folder or file name only; a Hub id or architecture name as given."""
        if model is None:
            return cls(None, revision, gguf_file)
        text = str(model)
        path = Path(text)
        if path.is_absolute() or text.startswith((".", "~")) or path.exists():
            text = path.expanduser().resolve().name
        return cls(text, revision, Path(gguf_file).name if gguf_file else None)


@dataclass(frozen=True)
class DataRef:
    """Data a method used: `name` (a Hub dataset, preset or alias, or a local file's name), `split`, `sha256`."""

    role: str
    name: str
    split: str | None = None
    sha256: str | None = None

    @classmethod
    def of(cls, role: str, dataset: str | Path, split: str | None = None) -> "DataRef":
        """A local file or folder is recorded by its name and the sha256 of its bytes (files sorted by name)."""
        path = Path(dataset)
        if not path.exists():
            return cls(role, str(dataset), split)
        return cls(role, path.resolve().name, split, file_sha256(path))


def file_sha256(path: Path) -> str:
    """sha256 of a file, or of the concatenated files of a folder in sorted order."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def provenance(method: str, options: MethodConfig, source: SourceRef, data: list[DataRef],
               figures: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The record for `config.compression`; `extra` holds further config dicts a method takes (e.g. calibration)."""
    from . import __version__

    figures = dict(figures or {})
    clash = sorted(set(figures) & {"method", "options", "source", "data", "hf_compress_version", *extra})
    if clash:
        raise ValueError(f"figure name(s) {clash} collide with the record's own keys")
    return {
        "method": method,
        "options": options.to_dict(),
        **{key: value.to_dict() if isinstance(value, MethodConfig) else value for key, value in extra.items()},
        "source": asdict(source),
        "data": [asdict(ref) for ref in data],
        **figures,
        "hf_compress_version": __version__,
    }


def config_from_provenance(record: dict[str, Any]) -> MethodConfig:
    """The method config a saved record was produced with (`record` is a checkpoint's `config.compression`)."""
    method = record.get("method") if isinstance(record, dict) else None
    if method not in METHOD_CONFIGS:
        raise HFCompressError(f"the compression record names method {method!r}; known: {sorted(METHOD_CONFIGS)}")
    module, _, name = METHOD_CONFIGS[method].partition(":")
    return getattr(importlib.import_module(module), name).from_dict(record["options"])
