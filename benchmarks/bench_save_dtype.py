"""Does saving in the source's bfloat16 cost quality? SmolLM2-135M-Instruct, default conversion (protocol "quick"),
saved once in float32 and once in bfloat16 (the default for this source), each checkpoint then measured from its
saved files exactly as `hf-compress ppl` does (float32 compute, WikiText-2 test, first 20 windows of 2048).

    python benchmarks/bench_save_dtype.py [--ratio 0.2] [--work-dir DIR]

The conversions are made under --work-dir unless a checkpoint is already there (pass --work-dir to reuse folders of
`hf-compress convert ... --save-dtype float32|bfloat16`). Writes `results/save_dtype.json` and `results/save_dtype.md`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from bench_common import device_note, write_results

from hf_compress import __version__
from hf_compress.data.local import data_root

DTYPES = ("float32", "bfloat16")
TOLERANCE = 0.01  # the relative perplexity change accepted for the smaller files


def _checkpoint(work: Path, ratio: float, dtype: str) -> Path:
    folder = work / f"smollm2-bs-{ratio:g}-{dtype}"
    if not (folder / "config.json").exists():
        from hf_compress.basis_sharing import (
            BasisSharingConfig,
            CalibrationConfig,
            convert,
        )

        calib = CalibrationConfig(dataset=str(data_root() / "c4" / "calibration-00000-of-00001.parquet"))
        convert("smollm2", folder, BasisSharingConfig(ratio=ratio, save_dtype=dtype), calibration=calib)
    return folder


def _weights_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--work-dir", default=os.path.expanduser("~/.cache/hf-compress-bench/save_dtype"))
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    from hf_compress.basis_sharing.evaluation import model_perplexity

    wikitext = str(data_root() / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet")
    rows = []
    for dtype in DTYPES:
        folder = _checkpoint(Path(args.work_dir), args.ratio, dtype)
        saved = json.loads((folder / "config.json").read_text())["compression"]["output_dtype"]
        if saved != dtype:
            raise SystemExit(f"{folder} holds {saved} weights, expected {dtype}")
        rows.append({"save_dtype": dtype, "weights_mb": _weights_mb(folder),
                     "wikitext2_ppl": model_perplexity(str(folder), wikitext, max_windows=20, dtype="float32")})
    reference = rows[0]["wikitext2_ppl"]
    for row in rows:
        row["relative_change"] = row["wikitext2_ppl"] / reference - 1
    within = abs(rows[1]["relative_change"]) <= TOLERANCE
    report = {"protocol": "quick", "ratio": args.ratio, "rows": rows, "within_1_percent": within,
              "device": device_note(), "hf_compress_version": __version__, "note": args.note}
    lines = [(f"SmolLM2-135M-Instruct at {args.ratio:.0%}, WikiText-2 quick perplexity of the saved checkpoint "
             "(float32 compute)."), "", "| saved as | weights (MB) | perplexity | change vs float32 |", "|---|---|---|---|"]
    lines += [f"| {r['save_dtype']} | {r['weights_mb']:.1f} | {r['wikitext2_ppl']:.3f} | {100 * r['relative_change']:+.2f}% |"
              for r in rows]
    lines += ["", f"bfloat16 within 1% of float32: {'yes' if within else 'NO'}."]
    write_results("save_dtype", report, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
