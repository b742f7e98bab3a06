"""Protocol "quick-heal" of BENCHMARKS.md: SmolLM2-135M-Instruct converted with the default Basis Sharing settings
(protocol "quick"), then healed by distillation from the dense model on the C4 calibration documents.

    python benchmarks/bench_quick_heal.py run                 # the main rows (20/30/40% at 262,144 tokens, 20% at 131,072)
    python benchmarks/bench_quick_heal.py run --rows ablations  # at 20% and 131,072 tokens: LoRA, LM loss, KL+LM, no sequential
    python benchmarks/bench_quick_heal.py table               # rewrite the markdown table from the rows

Each row: the student (converted once per ratio and conversion setting, kept under --work-dir), its WikiText-2 quick
perplexity (first 20 windows of 2048) and C4-validation perplexity (documents joined with "\\n\\n", first 20 windows
of 2048) before and after healing, the healing's wall time, peak RSS, tokens/s and trainable parameters. Healing
saves a resumable state every 25 steps, and a finished row is appended to `results/quick_heal.jsonl` at once, so the
script may be stopped at any time and started again: it continues with the first row not yet measured.
Healing never sees an evaluation text: its data is the C4 *calibration* documents (a train shard).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_compress import __version__
from hf_compress.basis_sharing import BasisSharingConfig, CalibrationConfig
from hf_compress.checkpoint import atomic_write_json, atomic_write_text
from hf_compress.data.text import load_texts, resolve_text_source, tokenize_joined
from hf_compress.device import PeakMemory
from hf_compress.evaluation.perplexity import window_losses
from hf_compress.healing import HealConfig

RESULTS = Path(__file__).resolve().parent / "results"
ROWS_FILE = RESULTS / "quick_heal.jsonl"
TABLE_FILE = RESULTS / "quick_heal.md"
EVAL_WINDOWS, EVAL_SEQ_LEN = 20, 2048


@dataclass(frozen=True)
class Row:
    """One healing run: the student's ratio and conversion setting, the budget and the healing options."""

    name: str
    ratio: float
    tokens: int
    heal: dict = field(default_factory=dict)
    sequential: bool = True

    @property
    def student(self) -> str:
        return f"student-r{self.ratio:g}" + ("" if self.sequential else "-nosequential")


ROWS = {
    "main": [
        Row("r0.2-262k", 0.2, 262144),
        Row("r0.3-262k", 0.3, 262144),
        Row("r0.4-262k", 0.4, 262144),
        Row("r0.2-131k", 0.2, 131072),
    ],
    "ablations": [
        Row("r0.2-131k-lora", 0.2, 131072, {"trainable": "lora"}),
        Row("r0.2-131k-lm", 0.2, 131072, {"loss": "lm"}),
        Row("r0.2-131k-kl+lm", 0.2, 131072, {"loss": "kl+lm"}),
        Row("r0.2-131k-nosequential", 0.2, 131072, sequential=False),
    ],
    "extra": [
        Row("r0.1-262k", 0.1, 262144),
        Row("r0.5-262k", 0.5, 262144),
    ],
}


class Evaluator:
    """WikiText-2 quick and C4-validation perplexity (20 windows of 2048 each), the texts tokenized once."""

    def __init__(self, tokenizer) -> None:
        self.ids = {name: tokenize_joined(tokenizer, load_texts(resolve_text_source(name))) for name in ("wikitext2", "c4")}

    def __call__(self, model) -> dict[str, float]:
        model.eval()
        out = {}
        with torch.no_grad():
            for name, ids in self.ids.items():
                losses = window_losses(model, ids, seq_len=EVAL_SEQ_LEN, max_windows=EVAL_WINDOWS, progress=False)
                out[name] = math.exp(sum(losses) / len(losses))
        return out


def read_rows() -> list[dict]:
    if not ROWS_FILE.exists():
        return []
    return [json.loads(line) for line in ROWS_FILE.read_text().splitlines() if line.strip()]


def append_row(row: dict) -> None:
    rows = read_rows() + [row]
    atomic_write_text(ROWS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def cached(path: Path, compute) -> dict:
    """`compute()`, kept in `path` so a restarted run does not measure it again."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    atomic_write_json(path, value)
    return value


def dense_eval(work: Path, evaluator_of) -> dict:
    def compute() -> dict:
        from hf_compress.sources import load_causal_lm

        model, tokenizer = load_causal_lm("smollm2")
        return evaluator_of(tokenizer)(model)

    return cached(work / "dense_eval.json", compute)


def student(row: Row, work: Path, evaluator_of) -> tuple[Path, dict]:
    """The default conversion at `row.ratio` (converted once), with its perplexities and conversion figures."""
    from hf_compress.basis_sharing import convert
    from hf_compress.sources import load_causal_lm

    folder = work / row.student
    if not (folder / "config.json").exists():
        result = convert("smollm2", folder, BasisSharingConfig(ratio=row.ratio, sequential=row.sequential),
                         calibration=CalibrationConfig(dataset="c4-calibration"), overwrite=True)
        atomic_write_json(work / f"{row.student}.convert.json",
                          {"wall_time_s": result.wall_time_s, "peak_rss_mb": result.peak_memory_mb,
                           "achieved_ratio": result.achieved_ratio, "timings": result.timings})

    def compute() -> dict:
        model, tokenizer = load_causal_lm(str(folder))
        return evaluator_of(tokenizer)(model)

    figures = cached(work / f"{row.student}.eval.json", compute)
    return folder, {**figures, "conversion": json.loads((work / f"{row.student}.convert.json").read_text())}


def heal_row(row: Row, work: Path, evaluator_of) -> dict:
    from hf_compress.healing import heal
    from hf_compress.sources import load_causal_lm

    folder, before = student(row, work, evaluator_of)
    healed = work / f"healed-{row.name}"
    figures_file = work / f"healed-{row.name}.heal.json"
    config = HealConfig(tokens=row.tokens, **row.heal)
    if not figures_file.exists():
        # `heal` resumes from its state beside `healed` when an earlier run of this row was interrupted.
        with PeakMemory() as peak:
            result = heal(folder, healed, teacher="smollm2", config=config, overwrite=True)
        atomic_write_json(figures_file, {
            "wall_time_s": result.wall_time_s, "tokens_per_s_last_session": result.tokens_per_s,
            "resumed_from": result.resumed_from, "peak_rss_mb": peak.peak_mb, "trainable_params": result.trainable_params,
            "steps": result.steps, "tokens": result.tokens, "initial_loss": result.initial_loss,
            "final_loss": result.final_loss, "losses": result.losses, "dtype": config.resolve("cpu").dtype})
    heal_figures = json.loads(figures_file.read_text())
    model, tokenizer = load_causal_lm(str(healed))
    after = evaluator_of(tokenizer)(model)
    return {
        "row": row.name, "ratio": row.ratio, "achieved_ratio": before["conversion"]["achieved_ratio"],
        "budget_tokens": row.tokens, "sequential": row.sequential, "heal_options": config.to_dict(),
        "wikitext2_before": before["wikitext2"], "wikitext2_after": after["wikitext2"],
        "c4_before": before["c4"], "c4_after": after["c4"],
        "conversion_wall_time_s": before["conversion"]["wall_time_s"],
        "conversion_peak_rss_mb": before["conversion"]["peak_rss_mb"],
        **{f"heal_{key}": value for key, value in heal_figures.items() if key != "losses"},
        "heal_tokens_per_s": heal_figures["tokens"] / heal_figures["wall_time_s"],
        "loss_every_8_steps": heal_figures["losses"][::8],
        "hf_compress_version": __version__, "threads": torch.get_num_threads(),
    }


def write_table(work: Path, note: str = "") -> None:
    rows = read_rows()
    dense = {}
    dense_file = work / "dense_eval.json"
    lines = ["# quick-heal: SmolLM2-135M-Instruct, Basis Sharing (default conversion) healed by distillation", ""]
    if dense_file.is_file():
        dense = json.loads(dense_file.read_text())
        lines += [f"Dense model: WikiText-2 quick {dense['wikitext2']:.2f}, C4 validation (20 windows) {dense['c4']:.2f}.", ""]
    lines += ["| row | ratio | budget (tokens) | trainable params | WikiText-2 before -> after | C4 val before -> after "
              "| C4 after / dense | heal wall (s) | tokens/s | heal peak RSS (MB) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c4_vs_dense = f"{r['c4_after'] / dense['c4']:.2f}x" if dense else "-"
        lines.append(
            f"| {r['row']} | {r['ratio']:.0%} | {r['budget_tokens']:,} | {r['heal_trainable_params']:,} "
            f"| {r['wikitext2_before']:.2f} -> {r['wikitext2_after']:.2f} | {r['c4_before']:.2f} -> {r['c4_after']:.2f} "
            f"| {c4_vs_dense} | {r['heal_wall_time_s']:.0f} | {r['heal_tokens_per_s']:.0f} | {r['heal_peak_rss_mb']:,.0f} |")
    lines += ["", "Protocol \"quick-heal\" (BENCHMARKS.md); rows in `quick_heal.jsonl`. Healing data: the C4 calibration "
              "documents in 512-token chunks, seed-2023 order; evaluation texts are never trained on."]
    if note:
        lines += ["", note]
    atomic_write_text(TABLE_FILE, "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["run", "table"])
    parser.add_argument("--rows", nargs="+", default=["main"], help=f"row sets ({', '.join(ROWS)}) or row names")
    parser.add_argument("--work-dir", default=os.path.expanduser("~/.cache/hf-compress-bench/quick_heal"),
                        help="students, healed checkpoints and resumable states")
    parser.add_argument("--note", default="", help="written under the table (e.g. other jobs on the machine)")
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.stage == "table":
        write_table(work, args.note)
        return
    every = {row.name: row for rows in ROWS.values() for row in rows}
    wanted = [row for name in args.rows for row in (ROWS[name] if name in ROWS else [every[name]])]
    evaluators: dict = {}

    def evaluator_of(tokenizer) -> Evaluator:
        if "e" not in evaluators:
            evaluators["e"] = Evaluator(tokenizer)
        return evaluators["e"]

    dense = dense_eval(work, evaluator_of)
    atomic_write_json(RESULTS / "quick_heal_dense.json", dense)
    print(f"dense: {dense}", flush=True)
    for row in wanted:
        if any(r["row"] == row.name for r in read_rows()):
            print(f"{row.name}: already measured", flush=True)
            continue
        started = time.time()
        result = heal_row(row, work, evaluator_of)
        result["row_wall_time_s_this_session"] = time.time() - started
        result["note"] = args.note
        append_row(result)
        write_table(work, args.note)
        print(f"{row.name}: WikiText-2 {result['wikitext2_before']:.2f} -> {result['wikitext2_after']:.2f}, "
              f"C4 {result['c4_before']:.2f} -> {result['c4_after']:.2f}", flush=True)


if __name__ == "__main__":
    main()
