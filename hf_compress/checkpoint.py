"""Writing checkpoint folders, for every model family: whole or not at all.

Everything is written into a staging folder beside the destination (`.NAME.incomplete-XXXX`), which then takes the
destination's place by a swap: the old folder is moved aside (`.NAME.old-XXXX`), the new one moved in, the old one
deleted. At every instant the destination holds either the complete old or the complete new checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import HFCompressError

logger = logging.getLogger(__name__)

STAGING_MARK = ".incomplete-"
OLD_MARK = ".old-"
# Model types of the hf-compress families: a folder holding one of them is an output of ours.
OUR_MODEL_TYPES = ("shared_basis_llama", "pruned_cnn", "class_exit_resnet")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_umask(folder: Path) -> None:
    """Gives `folder` and everything in it the user's usual permissions.

    mkdtemp creates the staging folder 0700, and transformers writes `model.safetensors` through a private
    temporary file (0600): a checkpoint others are meant to read would be unreadable to them.
    """
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def is_our_output(folder: Path) -> bool:
    """Whether `folder` holds a checkpoint hf-compress wrote (a config of one of its families or with a
    `compression` record), or the resumable work of one of its runs."""
    config = folder / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and (data.get("model_type") in OUR_MODEL_TYPES or "compression" in data)
    return (folder / "iterations" / "state.json").is_file()


def _protected(output: Path, sources: Sequence[str | os.PathLike]) -> str | None:
    """Why `output` must never be written to, or None."""
    if output.parent == output:
        return "it is a filesystem root"
    home = Path.home().resolve()
    if output == home or output in home.parents:
        return "it is the home directory or one of its parents"
    cwd = Path.cwd().resolve()
    if output == cwd:
        return "it is the working directory"
    if output in cwd.parents:
        return "it contains the working directory"
    for source in sources:
        source_path = Path(source).expanduser()
        if not source_path.exists():
            continue
        source_path = source_path.resolve()
        source_dir = source_path if source_path.is_dir() else source_path.parent
        if output == source_dir or output in source_dir.parents or source_dir in output.parents:
            return f"it overlaps the source {source}"
    return None


def clean_stale_staging(output: Path) -> list[Path]:
    """Removes what an interrupted earlier write of `output` left beside it (`.NAME.incomplete-*`, `.NAME.old-*`)
    and says so; returns what was removed."""
    removed = []
    if not output.parent.is_dir():
        return removed
    for mark in (STAGING_MARK, OLD_MARK):
        for stale in output.parent.glob(f".{output.name}{mark}*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
                logger.warning("removed %s, left by an interrupted earlier run", stale)
    return removed


def prepare_output(
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    sources: Sequence[str | os.PathLike] = (),
    resumable: bool = False,
) -> Path:
    """Checks where a command will write, before any work, and cleans what an interrupted earlier run left.

    Refused: the working directory or a folder that contains it, the home directory or one of its parents, a
    filesystem root, a folder overlapping a `sources` path, an existing file, and an existing non-empty folder that
    is not an hf-compress output. An existing output of ours needs `overwrite`, unless `resumable` (a command that
    continues its own earlier run there). An empty folder is always accepted.
    """
    given = Path(output_dir).expanduser()
    output = given.resolve()
    reason = _protected(output, sources)
    if reason is not None:
        raise HFCompressError(f"refusing to write to {given}: {reason}; choose a new folder for OUTPUT")
    if output.exists() and not output.is_dir():
        raise HFCompressError(f"OUTPUT {given} exists and is a file, not a folder")
    if output.is_dir() and any(output.iterdir()):
        if not is_our_output(output):
            raise HFCompressError(
                f"OUTPUT {given} is a non-empty folder that holds no hf-compress output; it is never replaced, "
                "choose a new folder"
            )
        if not overwrite and not resumable:
            raise HFCompressError(f"OUTPUT {given} already exists (pass --overwrite to replace it)")
    clean_stale_staging(output)
    return given


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


def write_state(folder: Path, write: Callable[[Path], None]) -> None:
    """Writes a resumable run's state folder as a whole: `write` fills a staging folder beside `folder`, which then
    replaces it by a swap (`swap_into_place`), so that a save interrupted while writing leaves the previous state
    (and a staging folder that `clean_stale_staging` removes). For the run's own state only: checkpoints go through
    `write_checkpoint`, which guards what it replaces."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}{STAGING_MARK}", dir=folder.parent))
    try:
        write(staging)
        swap_into_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
    if output.exists() and not output.is_dir():
        raise HFCompressError(f"{output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        # The last line of defence behind `prepare_output`: never replace a folder we did not write.
        if not is_our_output(output):
            raise HFCompressError(f"{output} is a non-empty folder that holds no hf-compress output; not replacing it")
        if not overwrite:
            raise HFCompressError(f"{output} already exists (pass --overwrite to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}{STAGING_MARK}", dir=output.parent))
    carried: list[str] = []
    try:
        write(staging)
        _apply_umask(staging)
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


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Replaces the file `path` in one step: `write` writes a temporary file beside it (the path it is given), which
    then takes its place (`os.replace`); a write that fails leaves the old file and no temporary one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` of `text` (UTF-8)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, content: Any) -> None:
    """`atomic_write_text` of `content` as indented JSON."""
    atomic_write_text(path, json.dumps(content, indent=2) + "\n")
