"""Tries the bad inputs a new user might give every command, and counts how many get one clear line.

A clear answer is: exit code 2, exactly one line on stderr that starts with `hf-compress: error:`, no traceback, the
inputs left as they were and no code shipped with a model run (nor any pickle loaded). Run from the repository root
(every case is a fresh process, so a full run takes a while; `--only` picks cases by their description):

    python tests/bad_inputs.py [--verbose] [--only TEXT ...]

It builds its own tiny inputs in a temporary folder: a random Llama with a tiny tokenizer and its Basis Sharing
conversion, a tiny image dataset, CNN and ClassExitResNet, and broken copies of them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class _Trap:
    """Unpickling this creates the file `path`: proof that loading a pickle ran code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def build_inputs(root: Path) -> dict[str, Path]:
    """Tiny models and data files for the cases."""
    import numpy as np
    import pandas as pd
    import torch
    from conftest import TINY_TEXT, make_tokenizer, tiny_llama

    from hf_compress.basis_sharing.api import convert
    from hf_compress.basis_sharing.config import BasisSharingConfig, CalibrationConfig
    from hf_compress.early_exit.heads import load_exit_model
    from hf_compress.modeling.pruned_cnn import PrunedCNNForImageClassification, resnet_cifar_config
    from hf_compress.vision.checkpoint import save_checkpoint

    paths = {}
    tokenizer = make_tokenizer()
    src = root / "llama"
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(src)
    tokenizer.save_pretrained(src)
    paths["llama"] = src
    paths["text"] = root / "text.txt"
    paths["text"].write_text("\n".join(TINY_TEXT * 4))
    paths["empty_text"] = root / "empty.txt"
    paths["empty_text"].write_text("")
    paths["corrupt_parquet"] = root / "corrupt.parquet"
    paths["corrupt_parquet"].write_bytes(b"not a parquet file at all")
    paths["empty_parquet"] = root / "empty.parquet"
    pd.DataFrame({"text": pd.Series([], dtype=str)}).to_parquet(paths["empty_parquet"])
    paths["int_column"] = root / "ints.parquet"
    pd.DataFrame({"text": TINY_TEXT, "n": list(range(len(TINY_TEXT)))}).to_parquet(paths["int_column"])

    # Broken checkpoints: no config, truncated weights, a pickle, bad basis groups.
    paths["no_config"] = root / "no-config"
    paths["no_config"].mkdir()
    (paths["no_config"] / "model.safetensors").write_bytes(b"\0" * 16)
    truncated = root / "truncated"
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(truncated)
    tokenizer.save_pretrained(truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    paths["truncated"] = truncated
    pickled = root / "pickled"
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(pickled, safe_serialization=False)
    tokenizer.save_pretrained(pickled)
    for file in pickled.glob("*.safetensors"):
        file.unlink()
    if not (pickled / "pytorch_model.bin").exists():
        torch.save(tiny_llama(vocab_size=len(tokenizer)).state_dict(), pickled / "pytorch_model.bin")
    paths["pickled"] = pickled

    # A foreign model whose remote code would write a marker file when imported.
    foreign = root / "foreign"
    foreign.mkdir()
    marker = root / "REMOTE_CODE_RAN"
    (foreign / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (foreign / "config.json").write_text(json.dumps({"model_type": "evil",
                                                     "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    paths["foreign"], paths["marker"] = foreign, marker

    # Images: 4 classes of 8x8 images, and a tiny CIFAR-style PrunedCNN.
    from PIL import Image
    import io

    def png(seed: int) -> bytes:
        array = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    images = root / "images"
    images.mkdir()
    rows = [{"img": {"bytes": png(i), "path": None}, "label": i % 4} for i in range(40)]
    pd.DataFrame(rows).to_parquet(images / "train-00000-of-00001.parquet")
    pd.DataFrame(rows[:12]).to_parquet(images / "test-00000-of-00001.parquet")
    paths["images"] = images
    labels = {i: str(i) for i in range(4)}
    cnn = PrunedCNNForImageClassification(resnet_cifar_config(8, (4, 4, 4), id2label=labels,
                                                              label2id={v: k for k, v in labels.items()}, image_size=8))
    save_checkpoint(cnn, root / "cnn")
    paths["cnn"] = root / "cnn"
    # exit-report takes a ClassExitResNet: the CNN with exits attached (untrained, which the report does not mind).
    save_checkpoint(load_exit_model(root / "cnn"), root / "exits")
    paths["exits"] = root / "exits"

    # Broken vision checkpoints: no config, truncated weights, a pickle (which would leave the marker if unpickled),
    # shipped code for a model type transformers does not know (which would leave the marker if run).
    for name in ("cnn_no_config", "cnn_truncated", "cnn_pickled", "cnn_foreign"):
        shutil.copytree(root / "cnn", root / name)
        paths[name] = root / name
    (root / "cnn_no_config" / "config.json").unlink()
    weights = root / "cnn_truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "cnn_pickled" / "model.safetensors").unlink()
    torch.save({"trap": _Trap(marker)}, root / "cnn_pickled" / "pytorch_model.bin")
    config = json.loads((root / "cnn_foreign" / "config.json").read_text())
    config.update(model_type="evil_cnn", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (root / "cnn_foreign" / "config.json").write_text(json.dumps(config))
    (root / "cnn_foreign" / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")

    # heal: a converted (SharedBasisLlama) student, a teacher with another vocabulary, a text shorter than a batch.
    convert(str(src), root / "student", BasisSharingConfig(ratio=0.3),
            calibration=CalibrationConfig(dataset=str(paths["text"]), samples=4, seq_len=16), progress=False)
    paths["student"] = root / "student"
    other_vocab = root / "other-vocab"
    tiny_llama(vocab_size=len(tokenizer) + 16).save_pretrained(other_vocab)
    tokenizer.save_pretrained(other_vocab)
    paths["other_vocab"] = other_vocab
    paths["short_text"] = root / "short.txt"
    paths["short_text"].write_text("A few words.")

    paths["file"] = root / "a-file.txt"
    paths["file"].write_text("keep me")
    paths["not_ours"] = root / "not-ours"
    paths["not_ours"].mkdir()
    (paths["not_ours"] / "notes.md").write_text("keep me")
    return paths


def cases(p: dict[str, Path], out: Path) -> list[tuple[str, list[str], Path | None]]:
    """(what, argv after `hf-compress`, working directory or None)."""
    llama, text = str(p["llama"]), str(p["text"])
    convert = ["convert", llama, str(out / "bs"), "--calib-dataset", text, "--calib-samples", "2",
               "--calib-seq-len", "16"]
    # Calibration within the tiny model's context (256 positions), so that the data itself is what gets checked.
    short_calib = ["convert", llama, str(out / "bs"), "--calib-seq-len", "16", "--calib-dataset"]
    cnn, images = str(p["cnn"]), str(p["images"])
    prune = ["prune", cnn, str(out / "pruned"), "--dataset", images, "--accuracy-floor", "0.1", "--val-size", "8"]
    exits = ["early-exit", cnn, str(out / "exits"), "--dataset", images, "--n-val", "8"]
    ppl = ["ppl", llama, "--dataset", text]
    heal = ["heal", str(p["student"]), str(out / "healed"), "--teacher", llama, "--dataset", text, "--tokens", "64",
            "--seq-len", "16", "--batch-size", "2", "--device", "cpu", "--no-progress"]

    def vision(command: list[str], model: str) -> list[str]:
        return [command[0], str(p[model]), *command[2:]]

    return [
        # Outputs that must never be written.
        ("convert into the working directory", ["convert", llama, ".", "--overwrite", "--calib-dataset", text], p["not_ours"]),
        ("convert into the home directory", ["convert", llama, str(Path.home()), "--overwrite"], None),
        ("convert into the source folder", ["convert", llama, llama, "--overwrite"], None),
        ("convert into a file", ["convert", llama, str(p["file"])], None),
        ("convert over a folder that is not ours", ["convert", llama, str(p["not_ours"]), "--overwrite"], None),
        ("prune into the working directory", ["prune", cnn, ".", "--overwrite", "--accuracy-floor", "0.1"], p["not_ours"]),
        ("train into the working directory", ["train", "resnet20", ".", "--overwrite"], p["not_ours"]),
        ("early-exit into the home directory", ["early-exit", cnn, str(Path.home())], None),
        # convert: options found before the model loads.
        ("--eval-dataset missing", convert + ["--eval-dataset", str(out / "missing.parquet"), "--eval-seq-len", "16"],
         None),
        ("--eval-seq-len 0", convert + ["--eval-seq-len", "0", "--eval-dataset", text], None),
        ("--ratio 1.5", convert + ["--ratio", "1.5"], None),
        ("--ratio 0", convert + ["--ratio", "0"], None),
        ("--group-size 0", convert + ["--group-size", "0"], None),
        ("--group-size beyond the layers", convert + ["--group-size", "99"], None),
        ("--batch-size 0", convert + ["--batch-size", "0"], None),
        ("--device gpu", convert + ["--device", "gpu"], None),
        ("--device cuda without a GPU", convert + ["--device", "cuda"], None),
        ("--calib-seq-len beyond max_position_embeddings", convert[:-2] + ["--calib-seq-len", "100000"], None),
        ("empty calibration file", [*short_calib, str(p["empty_text"])], None),
        ("corrupt calibration parquet", [*short_calib, str(p["corrupt_parquet"])], None),
        ("calibration parquet with no rows", [*short_calib, str(p["empty_parquet"])], None),
        ("--calib-column that is not text", [*short_calib, str(p["int_column"]), "--calib-column", "n"], None),
        ("convert a folder without config.json", ["convert", str(p["no_config"]), str(out / "bs")], None),
        # ppl and loading.
        ("ppl --seq-len 0", ppl + ["--seq-len", "0"], None),
        ("ppl --max-windows -1", ppl + ["--max-windows", "-1"], None),
        ("ppl --max-windows 0", ppl + ["--max-windows", "0"], None),
        ("ppl --dtype unknown", ppl + ["--dtype", "float8"], None),
        ("ppl on a folder without config.json", ["ppl", str(p["no_config"]), "--dataset", text], None),
        # A --seq-len within the tiny models' context, so that the weight files are what is refused.
        ("ppl on truncated weights", ["ppl", str(p["truncated"]), "--dataset", text, "--seq-len", "16"], None),
        ("ppl on a pickled checkpoint", ["ppl", str(p["pickled"]), "--dataset", text, "--seq-len", "16"], None),
        ("eval of a model with foreign remote code", ["eval", str(p["foreign"]), "--tasks", "hfc_wikitext2",
                                                      "--output", str(out / "r.json")], None),
        # vision.
        ("prune --images-per-class 0", prune + ["--images-per-class", "0"], None),
        ("prune --accuracy-floor 1.5", ["prune", cnn, str(out / "pruned"), "--dataset", images, "--accuracy-floor", "1.5"], None),
        ("prune --batch-size 0", prune + ["--batch-size", "0"], None),
        ("prune dataset missing", ["prune", cnn, str(out / "pruned"), "--dataset", str(out / "nope"),
                                   "--accuracy-floor", "0.1"], None),
        ("early-exit --step 1.5", exits + ["--step", "1.5"], None),
        ("early-exit --exit-pool-size 0", exits + ["--exit-pool-size", "0"], None),
        ("early-exit --epochs -1", exits + ["--epochs", "-1"], None),
        ("exit-report --limit 0", ["exit-report", str(p["exits"]), "--dataset", images, "--limit", "0"], None),
        *[(f"{command[0]} of {what}", vision(command, model), None)
          for command in (prune, exits)
          for what, model in (("a folder without config.json", "cnn_no_config"), ("truncated weights", "cnn_truncated"),
                              ("a pickled checkpoint", "cnn_pickled"), ("a model with foreign remote code", "cnn_foreign"))],
        # heal.
        ("heal --tokens 0", heal + ["--tokens", "0"], None),
        ("heal --lr 0", heal + ["--lr", "0"], None),
        ("heal with a teacher of another vocabulary", [*heal[:3], "--teacher", str(p["other_vocab"]), *heal[5:]], None),
        ("heal a dense student", ["heal", llama, *heal[2:]], None),
        ("heal on a text shorter than one batch", heal + ["--dataset", str(p["short_text"])], None),
    ]


def digest(path: Path) -> str:
    if not path.exists():
        return ""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="print every answer")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="run only the cases whose description contains TEXT (repeatable)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hfc-bad-inputs-"))
    paths = build_inputs(root)
    watched = [p for key, p in paths.items() if key not in ("marker",)]
    before = {p: digest(p) for p in watched}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    clear = 0
    table = [case for case in cases(paths, root / "out") if not args.only or any(t in case[0] for t in args.only)]
    for what, argv, cwd in table:
        proc = subprocess.run([sys.executable, "-m", "hf_compress.cli", *argv], cwd=cwd or root, env=env,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
        lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
        errors = [line for line in lines if line.startswith("hf-compress: error:")]
        ok = proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr
        clear += ok
        mark = "ok  " if ok else "MISS"
        shown = errors[0] if errors else (lines[-1] if lines else f"(exit {proc.returncode}, no message)")
        print(f"{mark} {what}: {shown[:160]}", flush=True)
        if args.verbose and not ok:
            print(proc.stderr[-2000:])
    untouched = all(digest(p) == before[p] for p in watched)
    print(f"\n{clear} of {len(table)} bad inputs got one clear line (exit 2, no traceback).")
    print(f"inputs untouched: {'yes' if untouched else 'NO'}; remote code ran: "
          f"{'YES' if paths['marker'].exists() else 'no'}")
    return 0 if clear == len(table) and untouched and not paths["marker"].exists() else 1


if __name__ == "__main__":
    sys.exit(main())
