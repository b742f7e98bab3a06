"""Bad inputs of the vision commands (`train`, `prune`, `early-exit`, `exit-report`), through the real CLI.

Every case runs `python -m hf_compress.cli` in a fresh process and expects one clear answer: exit code 2, exactly one
line on stderr that names the option, file or field, no traceback, and nothing written where it was refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hf_compress.early_exit.heads import load_exit_model
from hf_compress.modeling.pruned_cnn import PrunedCNNForImageClassification, resnet_cifar_config
from hf_compress.vision.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 40  # rows of the tiny train split


def _png(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A 4-class dataset of 8x8 images, a tiny ResNet PrunedCNN, broken parquets, a file and a folder not ours."""
    root = tmp_path_factory.mktemp("vision-inputs")
    images = root / "images"
    images.mkdir()
    rows = [{"img": {"bytes": _png(i), "path": None}, "label": i % 4} for i in range(TRAIN_IMAGES)]
    pd.DataFrame(rows).to_parquet(images / "train-00000-of-00001.parquet")
    pd.DataFrame(rows[:12]).to_parquet(images / "test-00000-of-00001.parquet")
    pd.DataFrame({"text": ["a", "b"], "label": [0, 1]}).to_parquet(root / "noimg.parquet")
    pd.DataFrame({"img": pd.Series([], dtype=object), "label": pd.Series([], dtype="int64")}).to_parquet(
        root / "empty.parquet")
    labels = {i: str(i) for i in range(4)}
    config = resnet_cifar_config(8, (4, 4, 4), id2label=labels, label2id={v: k for k, v in labels.items()}, image_size=8)
    save_checkpoint(PrunedCNNForImageClassification(config), root / "cnn")
    save_checkpoint(load_exit_model(root / "cnn"), root / "exits")
    (root / "a-file.txt").write_text("keep me")
    (root / "not-ours").mkdir()
    (root / "not-ours" / "notes.md").write_text("keep me")
    return {"root": root, "images": images, "cnn": root / "cnn", "noimg": root / "noimg.parquet",
            "exits": root / "exits", "empty": root / "empty.parquet", "file": root / "a-file.txt", "not_ours": root / "not-ours",
            "missing": root / "missing"}


def run_cli(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`hf-compress ARGV` in a fresh process, offline and without a GPU."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "hf_compress.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=300)


def assert_one_clear_line(proc: subprocess.CompletedProcess, *names: str) -> str:
    """Exit 2, one `hf-compress: error:` line on stderr naming every one of `names`, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("hf-compress: error: "), proc.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def digest(path: Path) -> str:
    """A hash of every file under `path` (names and contents)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(str(f).encode() + f.read_bytes() for f in files)).hexdigest()


# -- options and data: one line, before any model is loaded ---------------------------------------------------------

def _prune(p, *extra):
    return ["prune", str(p["cnn"]), str(p["root"] / "out"), "--dataset", str(p["images"]), "--accuracy-floor", "0.1",
            "--val-size", "8", *extra]


def _train(p, *extra):
    return ["train", "resnet20", str(p["root"] / "out"), "--dataset", str(p["images"]), *extra]


def _early_exit(p, *extra):
    return ["early-exit", str(p["cnn"]), str(p["root"] / "out"), "--dataset", str(p["images"]), "--n-val", "8", *extra]


def _exit_report(p, *extra):
    return ["exit-report", str(p["exits"]), "--dataset", str(p["images"]), *extra]


def _missing_model(argv: list[str], p) -> list[str]:
    """`argv` with a model that does not exist: an option check that names its flag ran before any load."""
    return [argv[0], str(p["missing"]), *argv[2:]]


BAD_OPTIONS = [
    # (case, argv from the inputs, what the line names)
    ("prune --images-per-class 0", lambda p: _missing_model(_prune(p, "--images-per-class", "0"), p), ["images_per_class", "got 0"]),
    ("prune --accuracy-floor 1.5", lambda p: _missing_model(_prune(p, "--accuracy-floor", "1.5"), p), ["--accuracy-floor", "got 1.5"]),
    ("prune --accuracy-floor 30", lambda p: _missing_model(_prune(p, "--accuracy-floor", "30"), p), ["--accuracy-floor", "got 30"]),
    ("prune --val-size 0", lambda p: _missing_model(_prune(p, "--val-size", "0"), p), ["val_size", "got 0"]),
    ("prune --val-size = train split", lambda p: _prune(p, "--val-size", str(TRAIN_IMAGES)), ["--val-size", f"{TRAIN_IMAGES} images"]),
    ("prune --batch-size 0", lambda p: _missing_model(_prune(p, "--batch-size", "0"), p), ["batch_size", "got 0"]),
    ("prune --retrain-epochs -1", lambda p: _missing_model(_prune(p, "--retrain-epochs", "-1"), p), ["retrain_epochs", "got -1"]),
    ("train --epochs -1", lambda p: _train(p, "--epochs", "-1"), ["epochs", "got -1"]),
    ("train --batch-size 0", lambda p: _train(p, "--batch-size", "0"), ["batch_size", "got 0"]),
    ("train --val-size > train split", lambda p: _train(p, "--val-size", "100"), ["--val-size", f"{TRAIN_IMAGES} images"]),
    ("early-exit --n-val 0", lambda p: _missing_model(_early_exit(p, "--n-val", "0"), p), ["--n-val", "got 0"]),
    ("early-exit --n-val = train split", lambda p: _early_exit(p, "--n-val", str(TRAIN_IMAGES)), ["--n-val", f"{TRAIN_IMAGES} images"]),
    ("early-exit --step 1.5", lambda p: _missing_model(_early_exit(p, "--step", "1.5"), p), ["--step"]),
    ("early-exit --cost flops", lambda p: _missing_model(_early_exit(p, "--cost", "flops"), p), ["--cost", "'flops'"]),
    ("early-exit --exit-pool-size 0", lambda p: _missing_model(_early_exit(p, "--exit-pool-size", "0"), p), ["--exit-pool-size"]),
    ("early-exit --epochs -1", lambda p: _missing_model(_early_exit(p, "--epochs", "-1"), p), ["--epochs", "got -1"]),
    ("early-exit --batch-size 0", lambda p: _missing_model(_early_exit(p, "--batch-size", "0"), p), ["--batch-size", "got 0"]),
    ("exit-report --limit 0", lambda p: _missing_model(_exit_report(p, "--limit", "0"), p), ["--limit", "got 0"]),
    ("exit-report --batch-size 0", lambda p: _missing_model(_exit_report(p, "--batch-size", "0"), p), ["--batch-size", "got 0"]),
    ("exit-report --device cuda without a GPU", lambda p: _missing_model(_exit_report(p, "--device", "cuda"), p), ["--device cuda"]),
    ("exit-report --device gpu", lambda p: _missing_model(_exit_report(p, "--device", "gpu"), p), ["--device 'gpu'"]),
    ("exit-report of a model that is no ClassExitResNet", lambda p: ["exit-report", str(p["cnn"]), "--dataset", str(p["images"])],
     ["cnn", "'pruned_cnn'"]),
    ("exit-report of a missing model", lambda p: _missing_model(_exit_report(p), p), ["missing", "does not exist"]),
]

DATASETS = [
    # (case, command, dataset input, what the line names): a missing path for every command; the broken parquets
    # through both ways data is read (the splits of prune/train/early-exit, the one split of exit-report)
    *[(f"{command.__name__[1:]}: missing dataset folder", command, "missing", ["missing", "does not exist"])
      for command in (_prune, _train, _early_exit, _exit_report)],
    *[(f"{command.__name__[1:]}: {what}", command, key, names) for command in (_prune, _exit_report)
      for what, key, names in (("parquet without an image column", "noimg", ["noimg.parquet", "no image column", "'text'"]),
                               ("parquet without rows", "empty", ["empty.parquet", "no rows"]))],
]


@pytest.mark.parametrize("build, names", [case[1:] for case in BAD_OPTIONS], ids=[case[0] for case in BAD_OPTIONS])
def test_bad_option_gets_one_line_naming_it(inputs, build, names):
    proc = run_cli(build(inputs))
    assert_one_clear_line(proc, *names)
    assert not (inputs["root"] / "out").exists()


@pytest.mark.parametrize("command, key, names", [case[1:] for case in DATASETS], ids=[case[0] for case in DATASETS])
def test_bad_dataset_gets_one_line_naming_the_file(inputs, command, key, names):
    argv = command(inputs)
    argv[argv.index("--dataset") + 1] = str(inputs[key])
    proc = run_cli(argv)
    assert_one_clear_line(proc, *names)
    assert not (inputs["root"] / "out").exists()


def test_a_percentage_floor_is_read_aloud(inputs):
    # The dataset is missing, so the run stops right after reading the options.
    proc = run_cli(_prune(inputs, "--accuracy-floor", "92.5", "--dataset", str(inputs["missing"])))
    assert_one_clear_line(proc, "missing")
    assert "--accuracy-floor 0.925 (read 92.5 as a percentage)" in proc.stdout


# -- outputs that are never written ---------------------------------------------------------------------------------

def _with_output(command, output: str, *extra: str):
    """`command`'s argv with OUTPUT (its second argument) set to `output`, formatted with the inputs' paths."""
    def build(p):
        argv = command(p, *extra)
        argv[2] = output.format(**{key: str(path) for key, path in p.items()})
        return argv
    return build


REFUSED_OUTPUTS = [
    # (case, argv, working directory key or None, what the line names, the folder that must stay untouched)
    ("prune into the working directory", _with_output(_prune, ".", "--overwrite"), "not_ours", ["working directory"], "not_ours"),
    ("train into the working directory", _with_output(_train, ".", "--overwrite"), "not_ours", ["working directory"], "not_ours"),
    ("early-exit into the working directory", _with_output(_early_exit, ".", "--overwrite"), "not_ours", ["working directory"], "not_ours"),
    ("early-exit into the home directory", _with_output(_early_exit, "~"), None, ["home directory"], None),
    ("prune into its source", _with_output(_prune, "{cnn}", "--overwrite"), None, ["overlaps the source"], "cnn"),
    ("train into its source", lambda p: ["train", str(p["cnn"]), str(p["cnn"]), "--overwrite"], None, ["overlaps the source"], "cnn"),
    ("early-exit into its source", _with_output(_early_exit, "{cnn}", "--overwrite"), None, ["overlaps the source"], "cnn"),
    ("prune into its dataset folder", _with_output(_prune, "{images}/pruned"), None, ["overlaps the source"], "images"),
    ("prune into a file", _with_output(_prune, "{file}", "--overwrite"), None, ["a-file.txt", "is a file"], "file"),
    ("train into a file", _with_output(_train, "{file}", "--overwrite"), None, ["a-file.txt", "is a file"], "file"),
    ("early-exit into a file", _with_output(_early_exit, "{file}", "--overwrite"), None, ["a-file.txt", "is a file"], "file"),
    ("prune over a folder not ours", _with_output(_prune, "{not_ours}", "--overwrite"), None, ["not-ours", "no hf-compress output"], "not_ours"),
    ("train over a folder not ours", _with_output(_train, "{not_ours}", "--overwrite"), None, ["not-ours", "no hf-compress output"], "not_ours"),
    ("early-exit over a folder not ours", _with_output(_early_exit, "{not_ours}", "--overwrite"), None, ["not-ours", "no hf-compress output"], "not_ours"),
]


@pytest.mark.parametrize("build, cwd, names, watched", [case[1:] for case in REFUSED_OUTPUTS],
                         ids=[case[0] for case in REFUSED_OUTPUTS])
def test_refused_output_is_left_untouched(inputs, build, cwd, names, watched):
    before = {key: digest(inputs[key]) for key in ("cnn", "images", "file", "not_ours")}
    proc = run_cli(build(inputs), cwd=inputs[cwd] if cwd else inputs["root"])
    assert_one_clear_line(proc, *names)
    assert {key: digest(inputs[key]) for key in before} == before
    assert not list(inputs["root"].glob(".*.partial")) and not list(inputs["not_ours"].glob(".*"))
    if watched is not None:
        assert not list(inputs[watched].parent.glob(f".{inputs[watched].name}.*"))


def test_an_existing_checkpoint_needs_overwrite_and_prune_does_not_take_a_finished_one_as_its_run(inputs, tmp_path):
    import shutil

    ours = tmp_path / "trained"
    shutil.copytree(inputs["cnn"], ours)
    before = digest(ours)
    for argv in (_with_output(_prune, str(ours))(inputs), _with_output(_train, str(ours))(inputs),
                 _with_output(_early_exit, str(ours))(inputs)):
        assert_one_clear_line(run_cli(argv), str(ours), "--overwrite")
    assert digest(ours) == before


# -- what a finished run leaves ---------------------------------------------------------------------------------------

def test_early_exit_cleans_a_stale_staging_folder_and_leaves_nothing_beside_its_output(inputs, tmp_path):
    stale = tmp_path / ".exits.incomplete-dead"
    (stale / "sub").mkdir(parents=True)
    proc = run_cli(_with_output(_early_exit, str(tmp_path / "exits"), "--epochs", "1", "--batch-size", "16",
                                "--no-progress")(inputs))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"removed {stale}" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exits"]  # no .partial, no staging, no old copy
    config = json.loads((tmp_path / "exits" / "config.json").read_text())
    assert config["model_type"] == "class_exit_resnet" and len(config["exit_thresholds"]) == len(config["exit_positions"])


def test_prune_continues_its_own_run_without_overwrite(inputs, tmp_path):
    out = tmp_path / "pruned"
    args = ["--accuracy-floor", "0", "--retrain-epochs", "1", "--batch-size", "16", "--images-per-class", "2",
            "--max-classes", "4"]
    first = run_cli(_with_output(_prune, str(out), *args, "--max-iterations", "1")(inputs))
    assert first.returncode == 0, first.stderr[-2000:]
    stamp = os.stat(out / "iterations" / "iter_001" / "model.safetensors").st_mtime_ns
    second = run_cli(_with_output(_prune, str(out), *args, "--max-iterations", "2")(inputs))
    assert second.returncode == 0, second.stderr[-2000:]
    state = json.loads((out / "iterations" / "state.json").read_text())
    assert [row["iteration"] for row in state["rows"]] == [0, 1, 2]
    assert os.stat(out / "iterations" / "iter_001" / "model.safetensors").st_mtime_ns == stamp  # not redone
    assert "stopped: reached 2 iterations" in second.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]
