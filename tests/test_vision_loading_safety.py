"""Loading vision checkpoints safely: `prune` and `early-exit` refuse a bad checkpoint in one line before any work,
never unpickle weights and never run code a checkpoint ships."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from hf_compress.early_exit.heads import check_exit_source, load_exit_model
from hf_compress.errors import HFCompressError
from hf_compress.modeling.pruned_cnn import PrunedCNNForImageClassification, resnet_cifar_config
from hf_compress.vision.checkpoint import save_checkpoint
from hf_compress.vision.resnet_import import check_cnn_source, load_cnn


class _Trap:
    """Unpickling this creates a file: proof that loading a pickle runs code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _marker_code(marker: Path) -> str:
    """Python source that leaves `marker` behind when imported."""
    return f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict[str, Path]:
    """Copies of a tiny PrunedCNN checkpoint, each damaged one way, and the marker files their traps would write."""
    root = tmp_path_factory.mktemp("vision-loading")
    labels = {i: str(i) for i in range(4)}
    config = resnet_cifar_config(8, (4, 4, 4), id2label=labels, label2id={v: k for k, v in labels.items()}, image_size=8)
    good = root / "cnn"
    save_checkpoint(PrunedCNNForImageClassification(config), good)
    folders = {name: root / name for name in ("no_config", "truncated", "pickled", "foreign")}
    for folder in folders.values():
        shutil.copytree(good, folder)
    (folders["no_config"] / "config.json").unlink()
    weights = folders["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (folders["pickled"] / "model.safetensors").unlink()
    torch.save({"trap": _Trap(root / "unpickled")}, folders["pickled"] / "pytorch_model.bin")
    config_json = json.loads((folders["foreign"] / "config.json").read_text())
    config_json.update(model_type="evil_cnn", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                        "AutoModelForImageClassification": "modeling_evil.Evil"})
    (folders["foreign"] / "config.json").write_text(json.dumps(config_json))
    for name in ("configuration_evil", "modeling_evil"):
        (folders["foreign"] / f"{name}.py").write_text(_marker_code(root / "code-ran"))
    return {"root": root, "good": good, **folders, "markers": [root / "unpickled", root / "code-ran"]}


def run_cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`hf-compress ARGV` in a fresh process, offline and without a GPU, stdin closed (a prompt fails, never waits)."""
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "HF_MODULES_CACHE": str(cwd / "modules")}
    return subprocess.run([sys.executable, "-m", "hf_compress.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=300)


CASES = [
    # (folder, what the one line must say)
    ("no_config", ["{folder} has no config.json"]),
    ("truncated", ["{folder}/model.safetensors is not a readable safetensors file", "truncated"]),
    ("pickled", ["{folder}/pytorch_model.bin is a pickle checkpoint",
                 "refused because loading them can run arbitrary code", "safetensors"]),
    ("foreign", ["{folder} ships its own code", "AutoConfig, AutoModelForImageClassification",
                 "'evil_cnn'", "never runs code shipped with a model"]),
]
COMMANDS = {
    "prune": ["--accuracy-floor", "0.1", "--val-size", "8"],
    "early-exit": ["--n-val", "8"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("key, needles", CASES, ids=[case[0] for case in CASES])
def test_bad_checkpoint_gets_one_line_before_any_work(broken, command, key, needles):
    folder = broken[key]
    output = broken["root"] / f"out-{command}-{key}"
    # The dataset does not exist either: the model's own error shows it was checked before the data was read.
    argv = [command, str(folder), str(output), "--dataset", str(broken["root"] / "no-such-data"), *COMMANDS[command]]
    proc = run_cli(argv, cwd=broken["root"])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("hf-compress: error: "), proc.stderr
    for needle in needles:
        assert needle.format(folder=folder) in lines[0], (needle, lines[0])
    assert not output.exists() and not list(broken["root"].glob(f".{output.name}*"))
    assert not any(marker.exists() for marker in broken["markers"])


def test_the_same_checks_hold_in_process(broken):
    for key, needles in CASES:
        for check in (check_cnn_source, check_exit_source, load_cnn, load_exit_model):
            with pytest.raises(HFCompressError) as err:
                check(str(broken[key]))
            assert needles[0].format(folder=broken[key]) in str(err.value)
    assert check_cnn_source(str(broken["good"])) == check_exit_source(broken["good"]) == "pruned_cnn"
    assert not any(marker.exists() for marker in broken["markers"])


def test_a_resnet_with_an_auto_map_loads_with_its_own_class_and_no_code_run(tmp_path):
    """transformers knows 'resnet': the auto_map it carries is ignored, as transformers itself ignores it."""
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       layer_type="basic", num_labels=3)
    torch.manual_seed(0)
    resnet = transformers.ResNetForImageClassification(config).eval()
    folder, marker = tmp_path / "resnet", tmp_path / "code-ran"
    resnet.save_pretrained(folder)
    config_json = json.loads((folder / "config.json").read_text())
    config_json["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                               "AutoModelForImageClassification": "modeling_evil.Evil"}
    (folder / "config.json").write_text(json.dumps(config_json))
    for name in ("configuration_evil", "modeling_evil"):
        (folder / f"{name}.py").write_text(_marker_code(marker))

    pruned, _ = load_cnn(str(folder))
    exits = load_exit_model(folder).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = resnet(pixel_values=images).logits
        torch.testing.assert_close(pruned(pixel_values=images).logits, expected)
        torch.testing.assert_close(exits(pixel_values=images, early_exit=False).logits, expected)
    assert not marker.exists()
