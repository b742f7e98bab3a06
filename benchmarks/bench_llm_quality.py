"""LLM quality benchmark, protocol "quick" of ../shared/BENCHMARKS.md, on SmolLM2-135M-Instruct (CPU, float32 weights).

Calibration: the 500 C4 calibration documents joined with "\\n\\n", tokenized once, 512-token chunks, seed 2023,
the first 128 chunks of `randperm`. Evaluation: WikiText-2 test joined with "\\n\\n", windows of 2048, the first 20
(quick) or all (--full). One calibration pass of the dense model is shared by every row that only needs the dense
Grams; rows with --refit or sequential calibration run their own passes. The calibration forwards run in
--calib-dtype (default: the converter's choice for this machine); each row records it.

Rows are appended to benchmarks/results/llm_quality_quick.jsonl as they finish (the script resumes: rows already
there are skipped), and the markdown table benchmarks/results/llm_quality_quick.md is rewritten after each row.

    python benchmarks/bench_llm_quality.py --ratios 0.2 0.4 --methods svd-llm basis-sharing
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from hf_compress.basis_sharing.assembly import build_shared_basis_llama
from hf_compress.basis_sharing.compressor import (
    BasisSharingCompressor,
    count_compressed_params,
    dense_projection_params,
)
from hf_compress.basis_sharing.config import BasisSharingConfig
from hf_compress.data.text import (
    calibration_batch,
    load_texts,
    resolve_text_source,
    tokenize_joined,
)
from hf_compress.device import (
    CALIBRATION_DTYPES,
    PeakMemory,
    calibration_dtype,
    dtype_name,
)
from hf_compress.evaluation.perplexity import window_losses
from hf_compress.sources import load_source

RESULTS = Path(__file__).resolve().parent / "results"

# method name -> BasisSharingConfig fields (ratio filled in per row). Every row spells out its calibration mode and
# coefficient fit, so that the rows keep their meaning whatever the converter's defaults: Grams from the dense model
# (the papers' setting) unless the name says "sequential"; coefficients from the group's SVD unless it says
# "layer-fit" (refit implies its own fit).
_PAPER = dict(sequential=False, layer_fit=False)
METHODS: dict[str, dict] = {
    "svd": dict(group_size=1, whiten=False, **_PAPER),
    "svd-llm": dict(group_size=1, **_PAPER),
    "svd-llm+sequential": dict(group_size=1, sequential=True, layer_fit=False),
    "basis-sharing": dict(_PAPER),
    "basis-sharing+global": dict(rank_allocation="global", **_PAPER),
    "basis-sharing+global-absolute": dict(rank_allocation="global", rank_score="absolute", **_PAPER),
    "basis-sharing+layer-fit": dict(layer_fit=True, sequential=False),
    "basis-sharing+refit": dict(refit=True, **_PAPER),
    "basis-sharing+sequential": dict(sequential=True, layer_fit=False),
    "basis-sharing+multiple128": dict(rank_multiple=128, **_PAPER),
    "basis-sharing+global+refit": dict(rank_allocation="global", refit=True, **_PAPER),
    "basis-sharing+sequential+refit": dict(sequential=True, refit=True, layer_fit=False),
    "basis-sharing+sequential+layer-fit": dict(sequential=True, layer_fit=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--windows", type=int, default=20, help="evaluation windows (20 = quick; 0 = all, full)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-dtype", default="auto", choices=CALIBRATION_DTYPES,
                        help="dtype of the calibration forwards (auto: the converter's default for this machine)")
    parser.add_argument("--tag", default="quick")
    parser.add_argument("--jobs", nargs="+", default=None,
                        help="explicit METHOD@RATIO rows in this order (default: every method at every ratio)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    out_jsonl = RESULTS / f"llm_quality_{args.tag}.jsonl"
    RESULTS.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    dtype = calibration_dtype(args.calib_dtype, device)
    done = {(r["method"], r["target_ratio"], row_dtype(r)) for r in read_rows(out_jsonl)}

    model, tokenizer, _ = load_source("smollm2")
    calib_ids = calibration_batch(tokenizer, load_texts(resolve_text_source("c4-calibration")),
                                  samples=args.samples, seq_len=args.seq_len, seed=2023)
    eval_ids = tokenize_joined(tokenizer, load_texts(resolve_text_source("wikitext2")))
    max_windows = args.windows or None

    def ppl(m) -> float:
        losses = window_losses(m, eval_ids, seq_len=2048, max_windows=max_windows, progress=False)
        return math.exp(sum(losses) / len(losses))

    if not any(method == "dense" for method, _, _ in done):
        start = time.perf_counter()
        value = ppl(model)
        append(out_jsonl, {"method": "dense", "target_ratio": 0.0, "achieved_ratio": 0.0, "perplexity": value,
                           "eval_time_s": time.perf_counter() - start, "windows": args.windows})
    shared_grams, gram_time, gram_peak = None, 0.0, 0.0
    jobs = [(m, r) for r in args.ratios for m in args.methods]
    if args.jobs:
        jobs = [(job.split("@")[0], float(job.split("@")[1])) for job in args.jobs]
    for method, ratio in jobs:
        options = BasisSharingConfig(ratio=ratio, **METHODS[method])
        compressor = BasisSharingCompressor(model, options, calib_ids, device, progress=False, dtype=dtype)
        # A row without calibration forwards is the same in every dtype.
        row_calib = dtype_name(dtype) if compressor.runs_forwards else "none"
        if (method, ratio, row_calib) in done or (row_calib == "none" and any(d[:2] == (method, ratio) for d in done)):
            continue
        needs_own_pass = options.refit or options.sequential
        uses_dense_grams = compressor.needs_dense_grams()
        if shared_grams is None and uses_dense_grams:
            with PeakMemory() as peak:
                start = time.perf_counter()
                shared_grams = compressor.dense_grams()
                gram_time = time.perf_counter() - start
            gram_peak = peak.peak_mb
        with PeakMemory() as peak:
            start = time.perf_counter()
            factors = compressor.run(dense_grams=shared_grams if uses_dense_grams else None)
            compressed = build_shared_basis_llama(model, factors)
            own_time = time.perf_counter() - start
        params_before = dense_projection_params(model, factors)
        params_after = count_compressed_params(factors)
        start = time.perf_counter()
        value = ppl(compressed)
        # Conversion time of a stand-alone run: the shared dense calibration pass (if the method uses the
        # dense Grams) plus this row's own work; refit/sequential rows also run their own passes inside `run`.
        conversion_time = own_time + (gram_time if uses_dense_grams else 0.0)
        append(out_jsonl, {
            "method": method, "target_ratio": ratio, "achieved_ratio": 1 - params_after / params_before,
            "perplexity": value, "eval_time_s": time.perf_counter() - start,
            "conversion_time_s": conversion_time, "dense_gram_time_s": gram_time if uses_dense_grams else 0.0,
            "peak_rss_mb": max(peak.peak_mb, gram_peak if uses_dense_grams else 0.0),
            "own_pass": needs_own_pass, "calib_dtype": row_calib,
            "ranks": {k: [f.rank for f in v] for k, v in factors.items()},
            "windows": args.windows,
        })
        write_table(out_jsonl, RESULTS / f"llm_quality_{args.tag}.md")
        del compressed
    write_table(out_jsonl, RESULTS / f"llm_quality_{args.tag}.md")


def row_dtype(row: dict) -> str:
    """Calibration dtype of a row ("none": no calibration forward); rows from before the option ran in float32."""
    return row.get("calib_dtype", "float32")


def label(row: dict) -> str:
    return row["method"] + (f" ({row_dtype(row)})" if row_dtype(row) not in ("float32", "none") else "")


def row_order(row: dict) -> tuple[int, bool]:
    """Tables list methods in `METHODS` order (others first), float32 rows before bfloat16 ones."""
    index = list(METHODS).index(row["method"]) if row["method"] in METHODS else -1
    return index, label(row) != row["method"]


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)


def write_table(jsonl: Path, md: Path) -> None:
    rows = read_rows(jsonl)
    dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
    lines = [
        "| method | target | achieved | WikiText-2 ppl | x dense | conversion (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["target_ratio"], *row_order(r))):
        conv = f"{r['conversion_time_s']:.0f}" if "conversion_time_s" in r else "-"
        conv += " (see note)" if r.get("note") else ""
        peak = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        rel = f"{r['perplexity'] / dense:.2f}" if dense else "-"
        lines.append(f"| {label(r)} | {r['target_ratio']:.0%} | {r['achieved_ratio']:.2%} | {r['perplexity']:.2f} "
                     f"| {rel} | {conv} | {peak} |")
    notes = [f"- {label(r)} at {r['target_ratio']:.0%}: {r['note']}" for r in rows if r.get("note")]
    md.write_text("\n".join(lines + [""] + notes) + "\n\n" + pivot_table(rows) + "\n")


def pivot_table(rows: list[dict]) -> str:
    """WikiText-2 perplexity, one row per method and one column per target ratio ("-": not measured)."""
    ratios = sorted({r["target_ratio"] for r in rows if r["method"] != "dense"})
    labels = {label(r): row_order(r) for r in rows if r["method"] in METHODS}
    methods = sorted(labels, key=labels.get)
    value = {(label(r), r["target_ratio"]): r["perplexity"] for r in rows}
    lines = ["| method | " + " | ".join(f"{ratio:.0%}" for ratio in ratios) + " |", "|---" * (len(ratios) + 1) + "|"]
    for method in methods:
        cells = [f"{value[(method, ratio)]:.2f}" if (method, ratio) in value else "-" for ratio in ratios]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
