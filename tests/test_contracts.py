"""The contracts every method shares: config round trips, the provenance record, the atomic checkpoint writer."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hf_compress.checkpoint import atomic_write, atomic_write_json, prepare_output, write_checkpoint, write_state
from hf_compress.config import MethodConfig
from hf_compress.errors import HFCompressError
from hf_compress.provenance import DataRef, SourceRef, config_from_provenance, file_sha256, provenance


@dataclass
class InnerConfig(MethodConfig):
    samples: int = 4
    dataset: str = "c4-calibration"


@dataclass
class OuterConfig(MethodConfig):
    ratio: float = 0.2
    share: tuple[str, ...] = ("q_proj", "k_proj")
    positions: list[str] | None = None
    multiple: int | None = None
    inner: InnerConfig = field(default_factory=InnerConfig)


def test_config_round_trips_through_json_with_tuples_optionals_and_nested_configs():
    config = OuterConfig(ratio=0.35, share=("up_proj",), positions=["stage1", "stage2.1"], multiple=None,
                         inner=InnerConfig(samples=9, dataset="calib.parquet"))
    data = json.loads(json.dumps(config.to_dict()))
    assert data == {"ratio": 0.35, "share": ["up_proj"], "positions": ["stage1", "stage2.1"], "multiple": None,
                    "inner": {"samples": 9, "dataset": "calib.parquet"}}
    rebuilt = OuterConfig.from_dict(data)
    assert rebuilt == config
    assert isinstance(rebuilt.share, tuple) and isinstance(rebuilt.inner, InnerConfig)
    # A record with a field the config does not know is refused, not silently dropped.
    with pytest.raises(HFCompressError, match=r"OuterConfig has no field\(s\) \['rank'\]"):
        OuterConfig.from_dict({**data, "rank": 3})


def test_source_and_data_refs_never_keep_a_local_path(tmp_path):
    model_dir = tmp_path / "models" / "tiny-llama"
    model_dir.mkdir(parents=True)
    assert SourceRef.of(str(model_dir)) == SourceRef("tiny-llama")
    assert SourceRef.of("HuggingFaceTB/SmolLM2-135M-Instruct", "main") == SourceRef(
        "HuggingFaceTB/SmolLM2-135M-Instruct", "main")
    assert SourceRef.of(str(model_dir), gguf_file=str(model_dir / "m.gguf")).gguf_file == "m.gguf"

    data_file = tmp_path / "calib.txt"
    data_file.write_bytes(b"some calibration text\n" * 100)
    ref = DataRef.of("calibration", str(data_file))
    assert ref == DataRef("calibration", "calib.txt", None, hashlib.sha256(data_file.read_bytes()).hexdigest())
    # A folder hashes its files' bytes in name order.
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "b.parquet").write_bytes(b"second")
    (folder / "a.parquet").write_bytes(b"first")
    assert file_sha256(folder) == hashlib.sha256(b"firstsecond").hexdigest()
    # A Hub dataset name is recorded as given, with no hash.
    assert DataRef.of("train", "uoft-cs/cifar10", "train") == DataRef("train", "uoft-cs/cifar10", "train", None)


def test_provenance_record_layout_and_config_rebuild(tmp_path):
    record = provenance("class_aware_pruning", OuterConfig(ratio=0.5), SourceRef("resnet20"),
                        [DataRef("train", "cifar10", "train")], {"macs_before": 100, "macs_after": 40},
                        calibration=InnerConfig(samples=2))
    assert record["method"] == "class_aware_pruning"
    assert record["options"]["ratio"] == 0.5 and record["calibration"] == {"samples": 2, "dataset": "c4-calibration"}
    assert record["source"] == {"model_id": "resnet20", "revision": None, "gguf_file": None}
    assert record["data"] == [{"role": "train", "name": "cifar10", "split": "train", "sha256": None}]
    assert (record["macs_before"], record["macs_after"]) == (100, 40)
    assert isinstance(record["hf_compress_version"], str)
    with pytest.raises(ValueError, match="collide"):
        provenance("basis_sharing", OuterConfig(), SourceRef(None), [], {"options": 1})
    with pytest.raises(HFCompressError, match="names method 'magic'"):
        config_from_provenance({"method": "magic", "options": {}})


OURS = json.dumps({"model_type": "pruned_cnn"})


def _write_files(files: dict[str, str]):
    def write(folder: Path) -> None:
        for name, text in files.items():
            (folder / name).write_text(text)
    return write


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_write_checkpoint_refuses_an_existing_output_before_writing(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    called = []
    # Not ours: never replaced, even with overwrite.
    for overwrite in (False, True):
        with pytest.raises(HFCompressError, match="holds no hf-compress output"):
            write_checkpoint(out, lambda folder: called.append(folder), overwrite=overwrite)
    (out / "config.json").write_text(OURS)
    with pytest.raises(HFCompressError, match="already exists"):
        write_checkpoint(out, lambda folder: called.append(folder))
    assert called == [] and (out / "keep.txt").read_text() == "mine"


def _write_private_weights(folder: Path) -> None:
    # What transformers does: model.safetensors goes through a private (0600) temporary file.
    (folder / "config.json").write_text(OURS)
    (folder / "sub").mkdir()
    (folder / "sub" / "model.safetensors").write_text("weights")
    os.chmod(folder / "sub" / "model.safetensors", 0o600)


def test_write_checkpoint_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = write_checkpoint(tmp_path / "ckpt", _write_private_weights)
    finally:
        os.umask(old)
    modes = {path.relative_to(out).as_posix(): stat.S_IMODE(path.stat().st_mode) for path in out.rglob("*")}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert modes == {"config.json": 0o644, "sub": 0o755, "sub/model.safetensors": 0o644}


@pytest.mark.parametrize("failing_step", ["write", "move_new_in"])
def test_overwrite_keeps_the_complete_old_checkpoint_when_interrupted(tmp_path, monkeypatch, failing_step):
    out = tmp_path / "ckpt"
    write_checkpoint(out, _write_files({"config.json": OURS, "model.safetensors": "old weights"}))

    if failing_step == "write":
        def write(folder: Path) -> None:
            (folder / "config.json").write_text("{}")
            raise KeyboardInterrupt  # interrupted before the weights were written
    else:
        write = _write_files({"config.json": "{}", "model.safetensors": "new weights"})
        real_rename = Path.rename

        def rename(self, target):
            # The old folder has been moved aside; moving the new one in is interrupted.
            if self.name.startswith(".ckpt.incomplete-") and Path(target) == out:
                raise KeyboardInterrupt
            return real_rename(self, target)

        monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(out, write, overwrite=True)
    monkeypatch.undo()
    assert (out / "config.json").read_text() == OURS and (out / "model.safetensors").read_text() == "old weights"
    assert _leftovers(tmp_path, "ckpt") == []


def test_overwrite_swaps_in_the_new_checkpoint_and_carries_entries(tmp_path):
    out = tmp_path / "ckpt"
    write_checkpoint(out, _write_files({"config.json": OURS, "stale.bin": "x"}))
    (out / "iterations").mkdir()
    (out / "iterations" / "state.json").write_text("{\"rows\": 3}")
    write_checkpoint(out, _write_files({"config.json": "{}"}), overwrite=True, carry=["iterations"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "iterations"]
    assert (out / "config.json").read_text() == "{}"
    assert (out / "iterations" / "state.json").read_text() == "{\"rows\": 3}"
    assert _leftovers(tmp_path, "ckpt") == []


def test_atomic_write_json_replaces_whole_files(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"b": [1, 2]})
    assert json.loads(path.read_text()) == {"b": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]

    def killed(tmp: Path) -> None:  # a write (of any format) interrupted after part of the file is out
        tmp.write_bytes(b"{\"c\": ")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, killed)
    assert json.loads(path.read_text()) == {"b": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_write_state_replaces_a_state_folder_whole_or_not_at_all(tmp_path):
    state = tmp_path / ".out.heal-state"
    write_state(state, _write_files({"state.json": '{"step": 2}', "trainable.safetensors": "step 2"}))
    write_state(state, _write_files({"state.json": '{"step": 4}'}))
    assert sorted(p.name for p in state.iterdir()) == ["state.json"]  # nothing of the earlier state is left
    assert (state / "state.json").read_text() == '{"step": 4}'

    def killed(folder: Path) -> None:
        (folder / "state.json").write_text('{"step": 6}')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_state(state, killed)
    assert (state / "state.json").read_text() == '{"step": 4}'
    assert [p.name for p in tmp_path.iterdir()] == [".out.heal-state"]


def test_prepare_output_refuses_dangerous_places_before_any_work(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    source = tmp_path / "models" / "src"
    source.mkdir(parents=True)
    monkeypatch.chdir(work / "sub")
    cases = {
        ".": "the working directory",
        str(work): "contains the working directory",
        str(Path.home()): "home directory",
        "/": "filesystem root",
        str(source): "overlaps the source",
        str(source / "out"): "overlaps the source",
        str(work / "notes.txt"): "is a file",
        str(work / "sub" / ".."): "contains the working directory",
    }
    for output, reason in cases.items():
        for overwrite in (False, True):
            with pytest.raises(HFCompressError, match=reason):
                prepare_output(output, overwrite=overwrite, sources=[str(source)])
    # A non-empty folder that is not ours is refused even with --overwrite; ours needs it; empty is fine.
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("1,2")
    with pytest.raises(HFCompressError, match="holds no hf-compress output"):
        prepare_output(other, overwrite=True)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "config.json").write_text(OURS)
    with pytest.raises(HFCompressError, match="already exists"):
        prepare_output(ours)
    assert prepare_output(ours, overwrite=True) == ours
    assert prepare_output(ours, resumable=True) == ours
    (tmp_path / "empty").mkdir()
    assert prepare_output(tmp_path / "empty") == tmp_path / "empty"
    assert (work / "notes.txt").read_text() == "mine" and (other / "data.csv").read_text() == "1,2"


def test_prepare_output_cleans_what_an_interrupted_run_left(tmp_path, caplog):
    out = tmp_path / "ckpt"
    stale = [tmp_path / ".ckpt.incomplete-ab12cd", tmp_path / ".ckpt.old-1234abcd"]
    for folder in stale:
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    unrelated = tmp_path / ".other.incomplete-ab12cd"
    unrelated.mkdir()
    with caplog.at_level("WARNING", logger="hf_compress.checkpoint"):
        prepare_output(out)
    assert not any(folder.exists() for folder in stale) and unrelated.exists()
    assert sum("left by an interrupted earlier run" in r.getMessage() for r in caplog.records) == 2
