"""What a checkpoint weighs on disk: the dtype a source was stored in and the size of its and the output's weights.

The converter saves in the source's own dtype unless told otherwise (`BasisSharingConfig.save_dtype`), and records
both file sizes, so that a compressed checkpoint is compared with its source as the files a user downloads.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

from transformers import PretrainedConfig

from ..device import dtype_name

# GGUF `general.file_type` (llama.cpp's LlamaFileType) of the unquantized files; every other value is quantized.
_GGUF_FLOAT_TYPES = {0: "float32", 1: "float16", 32: "bfloat16"}
# A quantized GGUF keeps fewer bits per weight than bfloat16 holds, and bfloat16 has float32's range (no overflow
# when the saved model runs): its weights are saved in bfloat16 (SmolLM2's own dtype, for the bundled Q4_1 file).
_GGUF_QUANTIZED_DTYPE = "bfloat16"
# GGUF metadata value types: struct format of the fixed-size ones; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _read(handle: BinaryIO, fmt: str):
    return struct.unpack("<" + fmt, handle.read(struct.calcsize(fmt)))[0]


def _skip_value(handle: BinaryIO, value_type: int) -> None:
    if value_type == _GGUF_STRING:
        handle.seek(_read(handle, "Q"), os.SEEK_CUR)
    elif value_type == _GGUF_ARRAY:
        item_type, count = _read(handle, "I"), _read(handle, "Q")
        if item_type in _GGUF_SCALARS:
            handle.seek(count * struct.calcsize(_GGUF_SCALARS[item_type]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(handle, item_type)
    else:
        handle.seek(struct.calcsize(_GGUF_SCALARS[value_type]), os.SEEK_CUR)


def gguf_file_type(path: Path) -> int | None:
    """`general.file_type` of a GGUF file, read from its header alone (gguf's reader maps every tensor first, which
    takes seconds), or None if the header has none."""
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            return None
        _read(handle, "I")  # version
        _read(handle, "Q")  # tensor count
        for _ in range(_read(handle, "Q")):
            key = handle.read(_read(handle, "Q")).decode("utf-8", "replace")
            value_type = _read(handle, "I")
            if key == "general.file_type" and value_type in _GGUF_SCALARS:
                return int(_read(handle, _GGUF_SCALARS[value_type]))
            _skip_value(handle, value_type)
    return None


def source_dtype(config: PretrainedConfig, gguf_path: Path | None = None) -> str:
    """The dtype the source's weights are stored in: its config's `dtype` (`torch_dtype` in older files), or for a
    GGUF file its `general.file_type`; float32 when neither says."""
    if gguf_path is not None:
        file_type = gguf_file_type(gguf_path)
        if file_type is None:
            return "float32"
        return _GGUF_FLOAT_TYPES.get(file_type, _GGUF_QUANTIZED_DTYPE)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if dtype is None or isinstance(dtype, str):
        return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"
    return dtype_name(dtype)


def gguf_type_name(file_type: int) -> str:
    """`Q4_1` for `general.file_type` 3: llama.cpp's name of a GGUF file type (`type 3` without the gguf package)."""
    try:
        from gguf import LlamaFileType

        name = LlamaFileType(file_type).name
    except (ImportError, ValueError):
        return f"type {file_type}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def source_format(gguf_path: Path | None) -> str | None:
    """`GGUF Q4_1`: how a quantized GGUF source is stored, which its `source_dtype` (the dtype its weights are
    dequantized to) does not say; None for any other source."""
    file_type = gguf_file_type(gguf_path) if gguf_path is not None else None
    if file_type is None or file_type in _GGUF_FLOAT_TYPES:
        return None
    return f"GGUF {gguf_type_name(file_type)}"


def weight_files(folder: Path) -> list[Path]:
    """The weight files transformers loads from a model folder: its safetensors files, else its `.bin` files."""
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local snapshot folder of a Hub model already downloaded (the load just did), or None."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # not in the cache, or not a Hub id: the size is then not recorded
        return None


def source_file_bytes(folder: Path | None, gguf_name: str | None) -> int | None:
    """Bytes on disk of the weights of a source folder (the GGUF file `gguf_name` in it, if given), or None where
    the files cannot be found."""
    if folder is None:
        return None
    files = [folder / gguf_name] if gguf_name else weight_files(folder)
    files = [f for f in files if f.is_file()]
    return sum(os.path.getsize(f) for f in files) if files else None


def output_file_bytes(folder: Path) -> int:
    """Bytes on disk of the `model*.safetensors` files of a saved checkpoint."""
    return sum(os.path.getsize(f) for f in sorted(folder.glob("model*.safetensors")))


def source_footprint(source: str, gguf_file: str | None, revision: str | None,
                     config: PretrainedConfig) -> dict[str, str | int | None]:
    """`source_dtype`, `source_file_bytes` and, for a quantized GGUF file, `source_format` of a source (as `convert`
    takes it), for the provenance record."""
    from ..sources import resolve_source

    name_or_path, gguf_name = resolve_source(source, gguf_file)
    folder = Path(name_or_path) if Path(name_or_path).is_dir() else _hub_snapshot(name_or_path, revision)
    gguf_path = folder / gguf_name if gguf_name and folder is not None else None
    # A GGUF config carries no dtype: without the file, `source_dtype` falls back to float32.
    gguf_path = gguf_path if gguf_path is not None and gguf_path.is_file() else None
    footprint = {"source_dtype": source_dtype(config, gguf_path), "source_file_bytes": source_file_bytes(folder, gguf_name)}
    stored_as = source_format(gguf_path)
    return {**footprint, "source_format": stored_as} if stored_as else footprint
