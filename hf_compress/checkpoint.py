"""Writing checkpoint folders, for every model family: whole or not at all.

Everything is written into a staging folder beside the destination (`.NAME.incomplete-XXXX`), which then takes the
destination's place by a swap: the old folder is moved aside (`.NAME.old-XXXX`), the new one moved in, the old one
deleted. At every instant the destination holds either the complete old or the complete new checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import HFCompressError

STAGING_MARK = ".incomplete-"
OLD_MARK = ".old-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def swap_into_place(staging: Path, output: Path) -> None:
    """Moves the complete folder `staging` to `output`, replacing an existing `output` by a swap."""
    if not output.exists():
        staging.rename(output)
        return
    old = output.parent / f".{output.name}{OLD_MARK}{uuid.uuid4().hex[:8]}"
    output.rename(old)
    try:
        staging.rename(output)
    except BaseException:
        old.rename(output)  # put the old checkpoint back: the destination is never left empty
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(
    output_dir: str | os.PathLike,
    write: Callable[[Path], None],
    *,
    overwrite: bool = False,
    carry: Sequence[str] = (),
) -> Path:
    """Calls `write(staging_folder)` and moves the finished folder to `output_dir` atomically.

    Args:
        write: fills the staging folder (weights, config, remote code, tokenizer or image processor, card, ...).
        overwrite: replace an existing `output_dir`; without it an existing one is refused before any writing.
        carry: entries of an existing `output_dir` kept in the new folder (e.g. `iterations/` of a pruning run).
    """
    output = Path(output_dir)
    if output.exists() and not overwrite:
        raise HFCompressError(f"{output} already exists (pass --overwrite to replace it)")
    if output.exists() and not output.is_dir():
        raise HFCompressError(f"{output} exists and is not a folder")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}{STAGING_MARK}", dir=output.parent))
    # mkdtemp creates 0700; a checkpoint gets the user's usual permissions, as save_pretrained's folders do.
    os.chmod(staging, 0o777 & ~_umask())
    carried: list[str] = []
    try:
        write(staging)
        for name in carry:
            if (output / name).exists():
                (output / name).rename(staging / name)
                carried.append(name)
        swap_into_place(staging, output)
    except BaseException:
        for name in carried:  # never lose what was carried (earlier pruning iterations)
            if (staging / name).exists() and output.exists():
                (staging / name).rename(output / name)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def save_pretrained_checkpoint(
    model,
    output_dir: str | os.PathLike,
    *,
    processor=None,
    extra_files: dict[str, Any] | None = None,
    card: Callable[[Path], None] | None = None,
    overwrite: bool = False,
    carry: Sequence[str] = (),
) -> Path:
    """Saves a model of any hf-compress family with its tokenizer or image processor, atomically.

    `save_pretrained` writes the safetensors weights, the config with its `auto_map` and the family's remote-code
    files (registered with `register_for_auto_class`). `extra_files` maps file names to JSON-able objects or text;
    `card(staging)` writes the model card last, once the config is there to read.
    """

    def write(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(staging)
        for name, content in (extra_files or {}).items():
            text = content if isinstance(content, str) else json.dumps(content, indent=2) + "\n"
            (staging / name).write_text(text)
        if card is not None:
            card(staging)

    return write_checkpoint(output_dir, write, overwrite=overwrite, carry=carry)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replaces the file `path` with `text` in one step (a temporary file beside it, then `os.replace`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | os.PathLike, content: Any) -> None:
    """`atomic_write_text` of `content` as indented JSON."""
    atomic_write_text(path, json.dumps(content, indent=2) + "\n")
