"""`hf-compress convert` and `ppl` inputs: where they may write, what they refuse before any weights load, and the
dtype and size of what they save.

The bad-input cases run the real CLI in fresh processes (two at a time, they are mostly interpreter start-up) and
expect exit code 2, exactly one line on stderr that names the option or file, and no traceback. Their source's
weights file is garbage: a case that reached the weights would fail with another message.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TINY_TEXT, tiny_llama
from test_loading_safety import assert_one_line_error
from hf_compress.basis_sharing import BasisSharingConfig, CalibrationConfig, convert
from hf_compress.basis_sharing.footprint import gguf_file_type, source_dtype, source_format
from hf_compress.cards import format_bytes
from hf_compress.data.text import load_texts, resolve_text_source
from hf_compress.evaluation.perplexity import perplexity

# Offline and without a GPU: the Hub-name and --device cuda cases must not depend on the machine.
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def run_cli(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(ENV, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "hf_compress.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=600)


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()


def safetensors_dtypes(folder: Path) -> set[torch.dtype]:
    dtypes = set()
    for file in folder.glob("model*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            dtypes.update(handle.get_tensor(name).dtype for name in handle.keys())
    return dtypes


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_source_dir, calib_file) -> dict[str, Path]:
    """A source with garbage weights, bad text files, a file, a folder that is not ours and a working folder."""
    root = tmp_path_factory.mktemp("convert-inputs")
    broken = root / "broken-source"
    shutil.copytree(tiny_source_dir, broken)
    (broken / "model.safetensors").write_bytes(b"garbage, never to be loaded" * 100)
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("\n\n   \n")
    (root / "corrupt.parquet").write_bytes(b"not a parquet file at all")
    pd.DataFrame({"text": pd.Series([], dtype=str)}).to_parquet(root / "empty.parquet")
    pd.DataFrame({"text": TINY_TEXT, "n": list(range(len(TINY_TEXT)))}).to_parquet(root / "ints.parquet")
    (root / "a-file.txt").write_text("keep me")
    (root / "not-ours").mkdir()
    (root / "not-ours" / "notes.md").write_text("keep me")
    (root / "work").mkdir()
    (root / "work" / "notes.md").write_text("keep me")
    (root / "work" / "sub").mkdir()
    (root / "home").mkdir()
    (root / "home" / "notes.md").write_text("keep me")
    return {"root": root, "broken": broken, "text": calib_file, "source": tiny_source_dir}


def _convert(p, *extra, calib=None):
    return ["convert", str(p["broken"]), str(p["root"] / "out"), "--calib-dataset", str(calib or p["text"]),
            "--calib-samples", "2", "--calib-seq-len", "16", *extra]


def _ppl(p, *extra, dataset=None):
    return ["ppl", str(p["broken"]), "--dataset", str(dataset or p["text"]), "--seq-len", "16", *extra]


def _calib(p, name, *extra):
    return _convert(p, *extra, calib=p["root"] / name)


def _eval(p, dataset, *extra):
    return _convert(p, "--eval-dataset", str(dataset), "--eval-seq-len", "16", *extra)


# (case, argv from the inputs, working folder under root or None, what the one line names)
CASES = [
    # Outputs that are never written (with --overwrite, which does not change that).
    ("into the working directory", lambda p: ["convert", str(p["source"]), ".", "--overwrite"], "work",
     ["refusing to write to .", "working directory"]),
    ("into a parent of the working directory", lambda p: ["convert", str(p["source"]), "..", "--overwrite"],
     "work/sub", ["refusing to write to ..", "contains the working directory"]),
    ("into the home directory", lambda p: ["convert", str(p["source"]), str(p["root"] / "home"), "--overwrite"],
     None, ["home directory"]),
    ("into the source folder", lambda p: ["convert", str(p["source"]), str(p["source"]), "--overwrite"], None,
     ["overlaps the source"]),
    ("into a file", lambda p: ["convert", str(p["source"]), str(p["root"] / "a-file.txt")], None,
     ["a-file.txt", "is a file"]),
    ("over a folder that is not ours", lambda p: ["convert", str(p["source"]), str(p["root"] / "not-ours"),
                                                   "--overwrite"], None, ["not-ours", "no hf-compress output"]),
    # Options, checked before the weights load.
    ("--eval-dataset missing", lambda p: _eval(p, p["root"] / "missing.parquet"), None,
     ["--eval-dataset", "missing.parquet", "does not exist"]),
    ("--eval-dataset neither preset nor file (offline)", lambda p: _eval(p, "no-org/no-data"),
     None, ["--eval-dataset", "'no-org/no-data' is no preset", "wikitext2", "no local file", "offline"]),
    ("--eval-dataset empty file", lambda p: _eval(p, p["root"] / "empty.txt"), None,
     ["--eval-dataset", "empty.txt", "is empty"]),
    ("--eval-seq-len 0", lambda p: _convert(p, "--eval-seq-len", "0", "--eval-dataset", str(p["text"])), None,
     ["--eval-seq-len must be >= 2", "got 0"]),
    ("--eval-seq-len 1", lambda p: _convert(p, "--eval-seq-len", "1"), None, ["--eval-seq-len must be >= 2"]),
    ("--eval-seq-len beyond the context", lambda p: _convert(p, "--eval-seq-len", "100000", "--eval-dataset",
                                                             str(p["text"])), None,
     ["--eval-seq-len 100000", "max_position_embeddings 256"]),
    ("--eval-max-windows 0", lambda p: _convert(p, "--eval-max-windows", "0"), None,
     ["--eval-max-windows must be >= 1", "got 0"]),
    ("--ratio 1.5", lambda p: _convert(p, "--ratio", "1.5"), None, ["--ratio must be in (0, 1)", "1.5"]),
    ("--group-size 0", lambda p: _convert(p, "--group-size", "0"), None, ["--group-size", "(4)", "got 0"]),
    ("--group-size 99", lambda p: _convert(p, "--group-size", "99"), None, ["--group-size", "(4)", "got 99"]),
    ("--batch-size 0", lambda p: _convert(p, "--batch-size", "0"), None, ["--batch-size must be >= 1", "got 0"]),
    ("--calib-chat-fraction 1.5", lambda p: _convert(p, "--calib-chat-fraction", "1.5"), None,
     ["--calib-chat-fraction must be a number in [0, 1]", "1.5"]),
    ("--calib-chat-fraction without a chat template", lambda p: _convert(p, "--calib-chat-fraction", "0.25"), None,
     ["--calib-chat-fraction 0.25", "no chat template"]),
    ("--device gpu", lambda p: _convert(p, "--device", "gpu"), None, ["--device 'gpu' is not a device name"]),
    ("--device cuda without a GPU", lambda p: _convert(p, "--device", "cuda"), None,
     ["--device cuda", "torch sees none"]),
    ("--calib-seq-len beyond the context", lambda p: _convert(p, "--calib-seq-len", "100000"), None,
     ["--calib-seq-len 100000", "max_position_embeddings 256", "at most 256"]),
    ("--save-dtype float8", lambda p: _convert(p, "--save-dtype", "float8"), None,
     ["--save-dtype must be one of auto, float32, bfloat16, float16", "'float8'"]),
    # Calibration text that gives no text.
    ("empty calibration txt", lambda p: _calib(p, "empty.txt"), None, ["--calib-dataset", "empty.txt", "is empty"]),
    ("blank calibration txt", lambda p: _calib(p, "blank.txt"), None,
     ["--calib-dataset", "blank.txt", "holds no text"]),
    ("corrupt calibration parquet", lambda p: _calib(p, "corrupt.parquet"), None,
     ["--calib-dataset", "corrupt.parquet", "not a readable parquet file"]),
    ("calibration parquet with no rows", lambda p: _calib(p, "empty.parquet"), None,
     ["--calib-dataset", "empty.parquet", "has no rows"]),
    ("--calib-column of ints", lambda p: _calib(p, "ints.parquet", "--calib-column", "n"), None,
     ["--calib-dataset", "column 'n'", "int64", "not text", "['text']"]),
    ("--calib-column missing", lambda p: _calib(p, "ints.parquet", "--calib-column", "body"), None,
     ["--calib-dataset", "no column 'body'"]),
    # ppl.
    ("ppl --seq-len 0", lambda p: _ppl(p, "--seq-len", "0"), None, ["--seq-len must be >= 2", "got 0"]),
    ("ppl --seq-len beyond the context", lambda p: _ppl(p, "--seq-len", "4096"), None,
     ["--seq-len 4096", "max_position_embeddings 256"]),
    ("ppl --max-windows -1", lambda p: _ppl(p, "--max-windows", "-1"), None, ["--max-windows must be >= 1", "got -1"]),
    ("ppl --max-windows 0", lambda p: _ppl(p, "--max-windows", "0"), None, ["--max-windows must be >= 1", "got 0"]),
    ("ppl --dtype float8", lambda p: _ppl(p, "--dtype", "float8"), None,
     ["--dtype must be one of float32, bfloat16, float16", "'float8'"]),
    ("ppl --device gpu", lambda p: _ppl(p, "--device", "gpu"), None, ["--device 'gpu'"]),
    ("ppl empty --dataset", lambda p: _ppl(p, dataset=p["root"] / "empty.parquet"), None,
     ["--dataset", "empty.parquet", "has no rows"]),
    ("ppl corrupt --dataset", lambda p: _ppl(p, dataset=p["root"] / "corrupt.parquet"),
     None, ["--dataset", "corrupt.parquet", "not a readable parquet file"]),
]


@pytest.fixture(scope="module")
def answers(request, inputs) -> dict[str, tuple[subprocess.CompletedProcess, dict[Path, str]]]:
    """The process of every case selected in this session, run two at a time, with the digests of the inputs."""
    selected = {item.callspec.params["case"][0] for item in request.session.items
                if hasattr(item, "callspec") and "case" in item.callspec.params}
    root = inputs["root"]
    # HOME is the fake home of every case (libraries put their caches there): its own file is watched.
    watched = [root / "a-file.txt", root / "not-ours", root / "work", root / "home" / "notes.md", inputs["source"],
               inputs["broken"]]
    before = {path: digest(path) for path in watched}

    def run(case):
        what, argv, cwd, _ = case
        return what, run_cli(*argv(inputs), cwd=root / cwd if cwd else root, env_extra={"HOME": str(root / "home")})

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(run, [case for case in CASES if case[0] in selected]))
    return {what: (proc, before) for what, proc in results.items()}


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_gets_one_line_before_any_work(case, answers, inputs):
    what, _, _, needles = case
    proc, before = answers[what]
    assert_one_line_error(proc, *needles)
    # Nothing lost, nothing written: the inputs are as they were and no output or staging folder appeared.
    for path, value in before.items():
        assert digest(path) == value, path
    root = inputs["root"]
    assert not (root / "out").exists()
    assert not [p for p in root.rglob(".*incomplete-*")]


def test_convert_into_the_working_directory_keeps_its_files(tiny_source_dir, tmp_path):
    """`convert SRC . --overwrite` in a folder holding a file: refused, the file still there."""
    (tmp_path / "precious.txt").write_text("mine")
    proc = run_cli("convert", str(tiny_source_dir), ".", "--overwrite", cwd=tmp_path)
    assert proc.returncode == 2 and "working directory" in proc.stderr, proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]
    assert (tmp_path / "precious.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def bf16_source(tmp_path_factory, tokenizer) -> Path:
    """The tiny Llama saved in bfloat16 (its config says `dtype: bfloat16`)."""
    path = tmp_path_factory.mktemp("bf16-source") / "tiny-bf16"
    tiny_llama(vocab_size=len(tokenizer)).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_convert_saves_in_the_source_dtype_and_reports_the_sizes(bf16_source, calib_file, tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.incomplete-1a2b3c4d"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    proc = run_cli("convert", str(bf16_source), str(out), "--calib-dataset", str(calib_file), "--calib-samples", "4",
                   "--calib-seq-len", "32", "--eval-dataset", str(calib_file), "--eval-seq-len", "32",
                   "--eval-max-windows", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The interrupted earlier run's staging folder is gone, and the user is told.
    assert not stale.exists()
    assert f"removed {stale}, left by an interrupted earlier run" in proc.stderr
    # Saved in the source's bfloat16, every tensor, and the config says so (transformers loads it as such).
    assert safetensors_dtypes(out) == {torch.bfloat16}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    record = config["compression"]
    assert record["options"]["save_dtype"] == "auto"
    assert (record["source_dtype"], record["output_dtype"]) == ("bfloat16", "bfloat16")
    assert record["source_file_bytes"] == os.path.getsize(bf16_source / "model.safetensors")
    assert record["output_file_bytes"] == os.path.getsize(out / "model.safetensors")
    assert (f"weights on disk: {format_bytes(record['source_file_bytes'])} bfloat16 (source) -> "
            f"{format_bytes(record['output_file_bytes'])} bfloat16 (output)") in proc.stdout
    card = (out / "README.md").read_text()
    assert (f"| Weights on disk, source / output | {format_bytes(record['source_file_bytes'])} (bfloat16) / "
            f"{format_bytes(record['output_file_bytes'])} (bfloat16) |") in card
    # The perplexity recorded is that of the weights as saved, as `ppl` measures them (float32 products).
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    texts = load_texts(resolve_text_source(str(calib_file)))
    expected = perplexity(model, AutoTokenizer.from_pretrained(out), texts, seq_len=32, max_windows=3, progress=False)
    assert json.loads((out / "perplexity.json").read_text())["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_save_dtype_float32_is_kept_and_recorded(bf16_source, calib_file, tmp_path):
    result = convert(str(bf16_source), tmp_path / "out", BasisSharingConfig(save_dtype="float32"),
                     calibration=CalibrationConfig(dataset=str(calib_file), samples=4, seq_len=32), device="cpu",
                     progress=False)
    out = tmp_path / "out"
    assert safetensors_dtypes(out) == {torch.float32}
    record = json.loads((out / "config.json").read_text())["compression"]
    assert record["options"]["save_dtype"] == "float32"
    assert (record["source_dtype"], record["output_dtype"]) == ("bfloat16", "float32")
    assert result.output_file_bytes == record["output_file_bytes"] == os.path.getsize(out / "model.safetensors")
    assert result.source_file_bytes == os.path.getsize(bf16_source / "model.safetensors")
    assert result.provenance == record


def test_gguf_file_type_is_read_from_the_header(tmp_path):
    gguf = pytest.importorskip("gguf")
    for file_type, expected, stored_as in ((gguf.LlamaFileType.ALL_F32, "float32", None),
                                           (gguf.LlamaFileType.MOSTLY_F16, "float16", None),
                                           (gguf.LlamaFileType.MOSTLY_BF16, "bfloat16", None),
                                           (gguf.LlamaFileType.MOSTLY_Q4_1, "bfloat16", "GGUF Q4_1"),
                                           (gguf.LlamaFileType.MOSTLY_Q4_K_M, "bfloat16", "GGUF Q4_K_M")):
        path = tmp_path / f"{int(file_type)}.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        # Keys of every kind before the file type: the reader has to skip strings, arrays and scalars.
        writer.add_name("tiny")
        writer.add_token_list(["a", "bb", "ccc"])
        writer.add_token_scores([0.5, 0.25, 0.125])
        writer.add_context_length(256)
        writer.add_file_type(file_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        assert gguf_file_type(path) == int(file_type)
        assert source_dtype(None, path) == expected
        # A quantized file is named by its GGUF type (the summary and card would otherwise call it bfloat16).
        assert source_format(path) == stored_as
    (tmp_path / "no-type.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16))
    assert gguf_file_type(tmp_path / "no-type.gguf") is None
    assert source_dtype(None, tmp_path / "no-type.gguf") == "float32"
    assert source_format(tmp_path / "no-type.gguf") is None and source_format(None) is None
