"""Tries the bad inputs a new user might give every command, and counts how many get one clear line.

A clear answer is: exit code 2, exactly one line on stderr that starts with `hf-compress: error:`, no traceback, and
the input left as it was. Run from the repository root (about five minutes: every case is a fresh process):

    python tests/bad_inputs.py [--verbose]

It builds its own tiny inputs (a random Llama with a tiny tokenizer, a tiny image dataset and CNN) in a temporary
folder; the CIFAR-10 cases use the local copy when present.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def build_inputs(root: Path) -> dict[str, Path]:
    """Tiny models and data files for the cases."""
    import numpy as np
    import pandas as pd
    import torch
    from conftest import TINY_TEXT, make_tokenizer, tiny_llama

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
    cnn, images = str(p["cnn"]), str(p["images"])
    prune = ["prune", cnn, str(out / "pruned"), "--dataset", images, "--accuracy-floor", "0.1", "--val-size", "8"]
    exits = ["early-exit", cnn, str(out / "exits"), "--dataset", images, "--n-val", "8"]
    ppl = ["ppl", llama, "--dataset", text]
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
        ("--eval-dataset missing", convert + ["--eval-dataset", str(out / "missing.parquet")], None),
        ("--eval-seq-len 0", convert + ["--eval-seq-len", "0", "--eval-dataset", text], None),
        ("--ratio 1.5", convert + ["--ratio", "1.5"], None),
        ("--ratio 0", convert + ["--ratio", "0"], None),
        ("--group-size 0", convert + ["--group-size", "0"], None),
        ("--group-size beyond the layers", convert + ["--group-size", "99"], None),
        ("--batch-size 0", convert + ["--batch-size", "0"], None),
        ("--device gpu", convert + ["--device", "gpu"], None),
        ("--device cuda without a GPU", convert + ["--device", "cuda"], None),
        ("--calib-seq-len beyond max_position_embeddings", convert[:-2] + ["--calib-seq-len", "100000"], None),
        ("empty calibration file", ["convert", llama, str(out / "bs"), "--calib-dataset", str(p["empty_text"])], None),
        ("corrupt calibration parquet", ["convert", llama, str(out / "bs"), "--calib-dataset", str(p["corrupt_parquet"])], None),
        ("calibration parquet with no rows", ["convert", llama, str(out / "bs"), "--calib-dataset", str(p["empty_parquet"])], None),
        ("--calib-column that is not text", ["convert", llama, str(out / "bs"), "--calib-dataset", str(p["int_column"]),
                                             "--calib-column", "n"], None),
        ("convert a folder without config.json", ["convert", str(p["no_config"]), str(out / "bs")], None),
        # ppl and loading.
        ("ppl --seq-len 0", ppl + ["--seq-len", "0"], None),
        ("ppl --max-windows -1", ppl + ["--max-windows", "-1"], None),
        ("ppl --max-windows 0", ppl + ["--max-windows", "0"], None),
        ("ppl --dtype unknown", ppl + ["--dtype", "float8"], None),
        ("ppl on a folder without config.json", ["ppl", str(p["no_config"]), "--dataset", text], None),
        ("ppl on truncated weights", ["ppl", str(p["truncated"]), "--dataset", text], None),
        ("ppl on a pickled checkpoint", ["ppl", str(p["pickled"]), "--dataset", text], None),
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
        ("exit-report --limit 0", ["exit-report", cnn, "--dataset", images, "--limit", "0"], None),
    ]


def digest(path: Path) -> str:
    if not path.exists():
        return ""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="print every answer")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hfc-bad-inputs-"))
    paths = build_inputs(root)
    watched = [p for key, p in paths.items() if key not in ("marker",)]
    before = {p: digest(p) for p in watched}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    clear = 0
    table = cases(paths, root / "out")
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
