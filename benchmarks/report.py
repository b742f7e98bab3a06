"""Writes benchmarks/results/README.md, and the summary table of README.md, from the result files.

    python benchmarks/report.py            # rewrite both
    python benchmarks/report.py --check    # exit 1 if either file is out of date

Reads, under benchmarks/results/: llm_quality_quick.jsonl, lm_eval_*.json, pruning_*.json, early_exit_*.json,
cnn_cpu_*.json, quick_heal*.json* (when present), and the *.log files of single CLI runs. Once the chat stage of
bench_quick_heal.py has run, it also writes quick_heal_chat_exchange.md (one chat exchange, dense / unhealed / healed
at 20%) and puts the same exchange into README.md between <!-- chat-exchange:start --> and <!-- chat-exchange:end -->
where README.md has those markers. Every number in the generated text is formatted from those files; the few
facts the files do not record (what else ran on the machine, how old checkpoints were made) are kept in `CONTEXT`
below, in words.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RESULTS_README = RESULTS / "README.md"
# Where the unfinished "cifar-cpu" stages keep their finished steps (bench_common's default --work-dir).
CNN_CPU_WORK = ROOT / "benchmarks" / "work" / "cnn_cpu"
MAIN_README = ROOT / "README.md"
SUMMARY_START = "<!-- results-summary:start -->"
SUMMARY_END = "<!-- results-summary:end -->"
# The chat exchange of protocol "quick-heal" (`chat_exchange`): its own file, and README.md between these markers
# where README.md has them.
EXCHANGE_FILE = RESULTS / "quick_heal_chat_exchange.md"
EXCHANGE_START = "<!-- chat-exchange:start -->"
EXCHANGE_END = "<!-- chat-exchange:end -->"

# Facts about the runs that the result files do not record.
CONTEXT = {
    "make_main": "run on an otherwise idle 2-core machine",
    "bf16_cpu": "the benchmark CPU multiplies bfloat16 natively (AVX512-BF16, through oneDNN), so `--calib-dtype auto` "
                "picks bfloat16 there",
    "lm_eval_quick": "one job at a time on the two cores",
    "lm_eval_old_checkpoints": "older checkpoints, converted with a reduced calibration set and one-pass (dense) "
                               "calibration, under shared-CPU load",
    "lm_eval_quick_checkpoints": "converted with the defaults of the time: sequential calibration, float32 "
                                 "calibration forwards, no layer fit",
    "early_exit_cpu-reduced-resnet20": "ran while three other benchmark jobs shared the two CPU threads: the img/s "
                                       "columns are noisy",
    "early_exit_cpu-reduced-hf-resnet18": "ran while other benchmark jobs shared the two CPU threads: the img/s "
                                          "columns are noisy",
    "early_exit_cpu-reduced-resnet20-10k": "ran on a less loaded machine",
}
# Method tables list the LLM rows in this order (as benchmarks/bench_llm_quality.py does).
LLM_METHODS = [
    "svd", "svd-llm", "svd-llm+sequential", "basis-sharing", "basis-sharing+global", "basis-sharing+global-absolute",
    "basis-sharing+layer-fit", "basis-sharing+refit", "basis-sharing+sequential", "basis-sharing+multiple128",
    "basis-sharing+global+refit", "basis-sharing+sequential+refit", "basis-sharing+sequential+layer-fit",
]
DEFAULT_LLM = "basis-sharing+sequential+layer-fit (bfloat16)"
WIKITEXT_TEST_ARTICLES = 62  # articles of the WikiText-2 raw test split (EleutherAI/wikitext_document_level)


# ----------------------------------------------------------------------------------------------------- formatting
def pct(x: float, digits: int = 0) -> str:
    return f"{100 * x:.{digits}f}%"


def change(new: float, old: float, digits: int = 0) -> str:
    """'15% lower' / '3.4% higher' for new against old."""
    rel = new / old - 1
    return f"{pct(abs(rel), digits)} {'lower' if rel < 0 else 'higher'}"


def span(values, fmt) -> str:
    lo, hi = min(values), max(values)
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)} to {fmt(hi)}"


def ratios_text(ratios) -> str:
    return " / ".join(f"{r:.0%}" for r in ratios)


def ppl(x: float) -> str:
    return f"{x:.1f}"


def millions(x: float) -> str:
    return f"{x / 1e6:.2f}M"


def table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def std_error(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


# ----------------------------------------------------------------------------------------------------- loading
def load_json(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def load_jsonl(name: str) -> list[dict]:
    path = RESULTS / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


LOG_PATTERNS = {
    "params": r"compressed projections: ([\d,]+) -> ([\d,]+) parameters; target ratio ([\d.]+)%, achieved ([\d.]+)%",
    "conversion": r"conversion: ([\d.]+) s \(load ([\d.]+) s, (.*?)\), peak memory ([\d,]+) MB",
    "perplexity": r"perplexity on (\S+): ([\d.]+) \(source\) -> ([\d.]+) \(compressed\)",
    "wall": r"make main wall: ([\d.]+) s",
}


def load_log(name: str) -> dict | None:
    """The summary lines `hf-compress convert` prints, parsed (a log is one run, kept as it was printed)."""
    path = RESULTS / name
    if not path.exists():
        return None
    text = path.read_text()
    log: dict = {"file": name}
    for key, pattern in LOG_PATTERNS.items():
        match = re.search(pattern, text)
        if match:
            log[key] = match.groups()
    windows = re.search(r"--eval-max-windows (\d+)", text)
    log["eval_windows"] = windows.group(1) if windows else "all"
    if "conversion" in log:
        log["phases"] = {k.strip(): float(v) for v, k in
                         ((m.group(2), m.group(1)) for m in re.finditer(r"([a-z ]+?) ([\d.]+) s", log["conversion"][2]))}
    return log


def num(text: str) -> float:
    return float(text.replace(",", ""))


# ----------------------------------------------------------------------------------------------------- LLM quality
def llm_label(row: dict) -> str:
    dtype = row.get("calib_dtype", "float32")
    return row["method"] + (f" ({dtype})" if dtype not in ("float32", "none") else "")


def llm_order(row: dict) -> tuple[int, bool]:
    index = LLM_METHODS.index(row["method"]) if row["method"] in LLM_METHODS else -1
    return index, llm_label(row) != row["method"]


class LLMRows:
    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.by = {(llm_label(r), round(r["target_ratio"], 4)): r for r in rows}
        self.dense = next((r for r in rows if r["method"] == "dense"), None)
        self.ratios = sorted({round(r["target_ratio"], 4) for r in rows if r["method"] != "dense"})

    def get(self, label: str, ratio: float) -> dict | None:
        return self.by.get((label, round(ratio, 4)))

    def ppl(self, label: str, ratio: float) -> float | None:
        row = self.get(label, ratio)
        return row["perplexity"] if row else None

    def common(self, *labels: str) -> list[float]:
        return [r for r in self.ratios if all(self.get(label, r) for label in labels)]


def llm_section(llm: LLMRows, logs: dict) -> str:
    if not llm.rows:
        return ""
    dense = llm.dense["perplexity"] if llm.dense else None
    windows = llm.dense.get("windows") if llm.dense else None
    out = ["## LLM quality: SmolLM2-135M-Instruct, protocol \"quick\" (CPU)", ""]
    out.append(
        "`benchmarks/bench_llm_quality.py`, rows in `llm_quality_quick.jsonl`. SmolLM2-135M-Instruct dequantized from "
        "its GGUF file, float32; calibration on the C4 calibration file as the protocol prescribes; WikiText-2 test "
        f"perplexity over the first {windows} windows of 2048 tokens (dense: {dense:.2f}). Rows without `sequential` "
        "take every Gram from the dense model, as the papers do; rows without `layer-fit` keep the group SVD's "
        "coefficients. Rows marked `(bfloat16)` ran the calibration forwards' matrix products in bfloat16 "
        f"({CONTEXT['bf16_cpu']}); the others ran them in float32, before that option existed. "
        f"**`{DEFAULT_LLM}` is what `hf-compress convert` does by default on such a CPU.**")
    out.append("")
    # achieved ratios
    off = [abs(r["achieved_ratio"] - r["target_ratio"]) for r in llm.rows
           if r["method"] != "dense" and "multiple128" not in r["method"]]
    m128 = [r["achieved_ratio"] - r["target_ratio"] for r in llm.rows if "multiple128" in r["method"]]
    sentence = f"Every row lands on its target ratio (within {100 * max(off):.3f} points"
    if m128:
        sentence += f"; `multiple128` rows up to {100 * max(m128):.2f} points over, as whole steps of 128 allow"
    out += [sentence + ").", ""]

    # pivot
    labels = sorted({llm_label(r) for r in llm.rows if r["method"] != "dense"},
                    key=lambda lab: llm_order(next(r for r in llm.rows if llm_label(r) == lab)))
    out.append("WikiText-2 perplexity (\"-\": not measured):")
    out.append("")
    out.append(table(["method"] + [f"{r:.0%}" for r in llm.ratios],
                     [[lab] + [f"{llm.ppl(lab, r):.2f}" if llm.get(lab, r) else "-" for r in llm.ratios]
                      for lab in labels]))
    out.append("")
    out += llm_analysis(llm)
    out.append("")
    # all rows
    out.append("All rows, with the achieved ratio, the conversion time (calibration and decomposition, without loading "
               "the model; rows that use the dense Grams include their share of the one dense pass) and the peak RSS. "
               "A time marked \"(see note)\" was measured while other work shared the two cores, or carries extra work: "
               "it is not a speed figure.")
    out.append("")
    rows = []
    for r in sorted(llm.rows, key=lambda r: (r["target_ratio"], *llm_order(r))):
        conv = f"{r['conversion_time_s']:.0f}" if "conversion_time_s" in r else "-"
        conv += " (see note)" if r.get("note") else ""
        rows.append([llm_label(r), f"{r['target_ratio']:.0%}", f"{r['achieved_ratio']:.2%}", f"{r['perplexity']:.2f}",
                     f"{r['perplexity'] / dense:.2f}" if dense else "-", conv,
                     f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"])
    out.append(table(["method", "target", "achieved", "WikiText-2 ppl", "x dense", "conversion (s)", "peak RSS (MB)"],
                     rows))
    out.append("")
    notes = [f"- {llm_label(r)} at {r['target_ratio']:.0%}: {r['note']}" for r in
             sorted(llm.rows, key=lambda r: (*llm_order(r), r["target_ratio"])) if r.get("note")]
    if notes:
        out += ["Notes:", ""] + notes
    return "\n".join(out)


def llm_analysis(llm: LLMRows) -> list[str]:
    d, svdllm, paper = DEFAULT_LLM, "svd-llm", "basis-sharing"
    seq_bf16, seq_f32 = "basis-sharing+sequential (bfloat16)", "basis-sharing+sequential"
    out = ["What this shows:", ""]

    def series(label, ratios):
        return " / ".join(ppl(llm.ppl(label, r)) for r in ratios)

    high = [r for r in llm.common(d, svdllm) if r >= 0.2]
    if high:
        out.append(f"- **The default (sequential calibration + layer fit) against SVD-LLM**: {series(d, high)} at "
                   f"{ratios_text(high)}, against {series(svdllm, high)} for SVD-LLM, i.e. "
                   + ", ".join(change(llm.ppl(d, r), llm.ppl(svdllm, r)) for r in high) + ".")
    if llm.get(d, 0.1) and llm.get(svdllm, 0.1):
        line = (f"  At 10% it gives {ppl(llm.ppl(d, 0.1))} against {ppl(llm.ppl(svdllm, 0.1))} "
                f"({change(llm.ppl(d, 0.1), llm.ppl(svdllm, 0.1))})")
        if llm.get(seq_bf16, 0.1):
            line += (f"; sequential calibration without layer fit gives {ppl(llm.ppl(seq_bf16, 0.1))} there "
                     f"({change(llm.ppl(seq_bf16, 0.1), llm.ppl(d, 0.1), 1)} than the default)")
        out.append(line + ".")
    both = llm.common(paper, svdllm)
    if both:
        below = [r for r in both if llm.ppl(paper, r) <= llm.ppl(svdllm, r)]
        above = [r for r in both if r not in below]
        text = (f"- **The paper's one-pass setting** (`{paper}`: dense Grams, the group SVD's coefficients) is at or "
                f"below SVD-LLM at {ratios_text(below) or 'no ratio'}")
        if above:
            text += " and above it at " + ", ".join(
                f"{r:.0%} ({ppl(llm.ppl(paper, r))} vs {ppl(llm.ppl(svdllm, r))})" for r in above)
        out.append(text + " on this 135M model.")
    like = llm.common(d, "svd-llm+sequential (bfloat16)")
    if like:
        out.append(f"- **Like for like, most of the gain is the calibration.** SVD-LLM with the same sequential "
                   f"calibration (`svd-llm+sequential`, bfloat16 forwards) gives {series('svd-llm+sequential (bfloat16)', like)} "
                   f"at {ratios_text(like)}; against it the default is "
                   + ", ".join(f"{change(llm.ppl(d, r), llm.ppl('svd-llm+sequential (bfloat16)', r), 1)} at {r:.0%}"
                               for r in like)
                   + ". Once both are calibrated sequentially, sharing a basis between two layers of this 30-layer, "
                     "576-wide model buys about as much as the per-layer factorisation.")
    seq = [r for r in llm.common(seq_bf16, svdllm, d) if r >= 0.2]
    if seq:
        out.append(f"- **Sequential calibration is the largest single gain**: {series(seq_bf16, seq)} at "
                   f"{ratios_text(seq)} (bfloat16 forwards), "
                   f"{span([1 - llm.ppl(seq_bf16, r) / llm.ppl(svdllm, r) for r in seq], pct)} below SVD-LLM. "
                   "Layer fit then takes off another "
                   + " / ".join(pct(1 - llm.ppl(d, r) / llm.ppl(seq_bf16, r)) for r in seq)
                   + " for no extra pass.")
    lf = llm.common("basis-sharing+layer-fit", paper)
    if lf:
        out.append(f"- Layer fit helps without sequential calibration too: {series('basis-sharing+layer-fit', lf)} "
                   f"against {series(paper, lf)} at {ratios_text(lf)}. The group's SVD fits every member's "
                   "coefficients on the summed Gram, as if they saw the same inputs; each member's own least-squares "
                   "fit can only lower its own calibration loss.")
    bf = llm.common(seq_bf16, seq_f32)
    if bf:
        out.append("- **bfloat16 calibration forwards cost nothing measurable**: "
                   + ", ".join(f"{llm.ppl(seq_bf16, r):.2f} vs {llm.ppl(seq_f32, r):.2f} at {r:.0%}" for r in bf)
                   + f" (bfloat16 vs float32; {span([llm.ppl(seq_bf16, r) / llm.ppl(seq_f32, r) - 1 for r in bf], lambda x: f'{100 * x:+.2f}%')}).")
    rf = llm.common("basis-sharing+refit", svdllm, paper)
    if rf:
        helps = [r for r in rf if llm.ppl("basis-sharing+refit", r) < llm.ppl(paper, r)]
        hurts = [r for r in rf if r not in helps]
        text = "- **`--refit` helps only at high ratios.** On dense Grams it gives " + ", ".join(
            f"{ppl(llm.ppl('basis-sharing+refit', r))} at {r:.0%}" for r in rf)
        if hurts:
            text += (", worse than without it at " + ", ".join(
                f"{r:.0%} ({ppl(llm.ppl(paper, r))})" for r in hurts))
        sr = llm.common("basis-sharing+sequential+refit (bfloat16)", d)
        if sr:
            peak = max(llm.get("basis-sharing+sequential+refit (bfloat16)", r)["peak_rss_mb"] for r in sr)
            text += (". On top of sequential calibration it gives " + ", ".join(
                f"{ppl(llm.ppl('basis-sharing+sequential+refit (bfloat16)', r))} at {r:.0%}" for r in sr)
                + f", worse than the default ({', '.join(ppl(llm.ppl(d, r)) for r in sr)}), at a peak RSS of "
                  f"{peak / 1024:.1f} GB (it keeps every stage's dense targets)")
        out.append(text + ".")
    gl = llm.common("basis-sharing+global", paper)
    if gl:
        text = (f"- `--rank-allocation global` is worse than uniform ranks at every ratio measured: "
                f"{series('basis-sharing+global', gl)} at {ratios_text(gl)} with the relative score")
        ga = [r for r in llm.ratios if llm.get("basis-sharing+global-absolute", r)]
        if ga:
            text += ", " + ", ".join(f"{ppl(llm.ppl('basis-sharing+global-absolute', r))} at {r:.0%}" for r in ga) + \
                    " with the absolute one"
        out.append(text + ": the whitened truncation loss of one matrix is a poor proxy for the model's loss.")
    mm = llm.common("basis-sharing+multiple128", paper)
    if mm:
        out.append("- `--rank-multiple 128` costs " + ", ".join(
            f"x{llm.ppl('basis-sharing+multiple128', r) / llm.ppl(paper, r):.2f} at {r:.0%}" for r in mm)
                   + " against free ranks: with 576-wide projections a step of 128 is a large part of every rank. "
                     "On 4096-wide models, where it buys GPU speed, the grid is far finer relative to the ranks.")
    sv = [r for r in llm.ratios if llm.get("svd", r)]
    if sv:
        vals = [llm.ppl("svd", r) for r in sv]
        out.append(f"- Plain SVD without whitening collapses: perplexity {span(vals, lambda x: f'{x / 1e6:,.0f} million')} "
                   f"at {ratios_text(sv)}.")
    return out


# ----------------------------------------------------------------------------------------------------- logs
def logs_section(logs: dict) -> str:
    main, one = logs.get("make_main_smollm2.log"), logs.get("convert_smollm2_no_sequential.log")
    if not main:
        return ""
    out = ["## `make main` (CPU)", ""]
    before, after = num(main["params"][0]), num(main["params"][1])
    total, load, _, peak = main["conversion"]
    out.append(f"`make_main_smollm2.log`, {CONTEXT['make_main']}: Basis Sharing at {num(main['params'][2]):.0f}% with "
               "the defaults (sequential calibration, layer fit, `--calib-dtype auto`), protocol \"quick\" calibration, "
               f"perplexity on the first {main['eval_windows']} WikiText-2 windows.")
    out.append("")
    rows = [["`make main` (default)", f"{before:,.0f} -> {after:,.0f}", f"{main['params'][3]}%", total, load,
             ", ".join(f"{k} {v:.1f}" for k, v in main["phases"].items()), peak,
             f"{main['perplexity'][1]} -> {main['perplexity'][2]}"]]
    if one:
        rows.append(["`--no-sequential --no-layer-fit` (the paper's)",
                     f"{num(one['params'][0]):,.0f} -> {num(one['params'][1]):,.0f}", f"{one['params'][3]}%",
                     one["conversion"][0], one["conversion"][1],
                     ", ".join(f"{k} {v:.1f}" for k, v in one["phases"].items()), one["conversion"][3],
                     f"{one['perplexity'][1]} -> {one['perplexity'][2]}"])
    out.append(table(["run", "compressed-projection params", "achieved", "conversion (s)", "load (s)", "phases (s)",
                      "peak memory (MB)", "WikiText-2 ppl, source -> compressed"], rows))
    out.append("")
    if "wall" in main:
        evals = float(main["wall"][0]) - float(total)
        out.append(f"`make main` took {float(main['wall'][0]):.1f} s in all; about {evals:.0f} s of it is the two "
                   "perplexity evaluations (before and after).")
    if one:
        out[-1] += (f" The paper's one-pass setting converts {float(total) / float(one['conversion'][0]):.2f}x as fast "
                   f"for a perplexity of {float(one['perplexity'][2]):.1f} instead of {float(main['perplexity'][2]):.1f}: "
                   "sequential calibration runs each pair of layers four times (both dense, for the Grams on the "
                   "compressed stream, then both compressed, to carry the stream on) where one-pass runs it once.")
    others = sorted(name for name in logs if name.startswith("convert_smollm2_bs-"))
    if others:
        out += ["", (f"The checkpoints of the lm-eval comparison below were {CONTEXT['lm_eval_quick_checkpoints']} "
                     "(the log of the 20% one is not kept):"), ""]
        out.append(table(["log", "achieved", "conversion (s)", "peak memory (MB)"],
                         [[f"`{n}`", f"{logs[n]['params'][3]}%", logs[n]["conversion"][0], logs[n]["conversion"][3]]
                          for n in others]))
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------- lm-eval
def lm_eval_section(quick: dict | None, reduced: dict | None, zeroshot: dict | None, llm: LLMRows) -> str:
    out = ["## lm-evaluation-harness (CPU)", ""]
    if quick:
        recs, args = quick["records"], quick["args"]
        dense = next(r for r in recs if r["model"] == "dense")
        out.append(
            f"`benchmarks/bench_lm_eval.py --wikitext-docs {args['wikitext_docs']} --update-card`, results in "
            f"`lm_eval_{args['tag']}.json`. The checkpoints are `hf-compress convert smollm2` at each ratio, "
            f"{CONTEXT['lm_eval_quick_checkpoints']} (the defaults have since moved to bfloat16 forwards and layer "
            f"fit). lm-eval's `hfc_wikitext2` scores the first {dense['documents']} of the {WIKITEXT_TEST_ARTICLES} "
            f"WikiText-2 test articles ({dense['raw_tokens']:,} tokens of the raw text) and `hf-compress ppl` scores "
            f"the same {dense['documents']} articles (joined with a blank line, {dense['ppl_windows']} windows of "
            f"{args['max_length']} tokens). float32, {args['threads']} CPU threads, {CONTEXT['lm_eval_quick']}.")
        out.append("")
        out.append(lm_eval_table(recs))
        out.append("")
        tpw = dense["tokens"] / dense["words"]
        comp = [r for r in recs if r["model"] != "dense"]
        gaps = [1 - r["lm_eval_token_perplexity"] / r["ppl"] for r in comp]
        out.append(f"- `lm-eval token ppl (same NLL)` is `word_ppl ** (words / tokens)`: lm-eval's own total NLL over "
                   f"the tokens of the detokenized articles, the quantity comparable to `hf-compress ppl`; tokens/word "
                   f"is {tpw:.3f} for SmolLM2's tokenizer, so word perplexity magnifies every loss.")
        out.append(f"- On the same text, lm-eval's token perplexity is "
                   f"{pct(1 - dense['lm_eval_token_perplexity'] / dense['ppl'])} below `hf-compress ppl` for the dense "
                   f"model and {span(gaps, pct)} below for the compressed ones: lm-eval scores the detokenized text, "
                   "which is easier, and the compressed models lose more on the raw file's odd spacing. Both rank the "
                   "models the same way; the damage grows alike: "
                   + " / ".join(f"x{r['lm_eval_token_perplexity'] / dense['lm_eval_token_perplexity']:.1f}" for r in comp)
                   + " (lm-eval token ppl) against "
                   + " / ".join(f"x{r['ppl'] / dense['ppl']:.1f}" for r in comp)
                   + f" (`hf-compress ppl`) at {ratios_text([r['target_ratio'] for r in comp])}.")
        out.append(f"- Wall time per model: {span([r['lm_eval_wall_s'] for r in recs], lambda x: f'{x:.0f}')} s for "
                   "lm-eval (batch 1, model loading included; the dense model is dequantized from its GGUF each "
                   f"time), {span([r['ppl_wall_s'] for r in recs], lambda x: f'{x:.0f}')} s for `hf-compress ppl`.")
        if llm.dense:
            out.append(f"- `hf-compress ppl` on these {dense['documents']} articles ({dense['ppl']:.2f} dense) differs "
                       f"from the \"quick\" protocol's {llm.dense['perplexity']:.2f}, which scores the first "
                       f"{llm.dense['windows']} windows of the whole joined file.")
        out.append("")
    if reduced:
        recs, args = reduced["records"], reduced["args"]
        out.append(f"A smaller run on the {CONTEXT['lm_eval_old_checkpoints']} (`lm_eval_{args['tag']}.json`): "
                   f"lm-eval on {recs[0]['documents']} articles, `hf-compress ppl` on the first {args['ppl_windows']} "
                   f"windows of the joined file.")
        out.append("")
        out.append(lm_eval_table(recs))
        out.append("")
    if zeroshot:
        recs, args = zeroshot["records"], zeroshot["args"]
        n = args["zeroshot_limit"]
        tasks = [t for t in recs[0]["zeroshot"] if t != "hfc_zeroshot"]
        out.append(f"Zero-shot, far below protocol scale: **{n} items per task** (at {n} items the standard error of "
                   f"one task's accuracy is up to {std_error(0.5, n):.2f}), on the dense model and the "
                   f"{CONTEXT['lm_eval_old_checkpoints']} (`lm_eval_{args['tag']}.json`). Cells are acc / acc_norm; "
                   "the means are unweighted over tasks, as the papers report them.")
        out.append("")
        rows, means = [], {}
        for r in recs:
            z = r["zeroshot"]
            accn = [z[t]["acc_norm"] for t in tasks if "acc_norm" in z[t]]
            mean_acc = z.get("hfc_zeroshot", {}).get("acc", sum(z[t]["acc"] for t in tasks) / len(tasks))
            means[r["model"]] = (mean_acc, sum(accn) / len(accn))
            cells = [f"{z[t]['acc']:.2f}" + (f" / {z[t]['acc_norm']:.2f}" if "acc_norm" in z[t] else "") for t in tasks]
            rows.append([r["model"], *cells, f"{mean_acc:.3f}", f"{means[r['model']][1]:.3f}",
                         f"{r['zeroshot_wall_s']:.0f}"])
        out.append(table(["model", *tasks, "mean acc", "mean acc_norm", "wall s"], rows))
        out.append("")
        text = (f"At {n} items the tasks cannot separate the models: mean acc is "
                + " / ".join(f"{means[r['model']][0]:.3f}" for r in recs) + " and mean acc_norm "
                + " / ".join(f"{means[r['model']][1]:.3f}" for r in recs))
        if reduced:
            dense_ppl = next(r["ppl"] for r in reduced["records"] if r["model"] == "dense")
            grow = [f"x{r['ppl'] / dense_ppl:.0f}" for r in reduced["records"] if r["model"] != "dense"]
            text += f", while the same checkpoints' perplexity grows {' and '.join(grow)}"
        out.append(text + ". The protocol's item counts are needed for real numbers; wall times include model "
                          "loading under shared-CPU load.")
    return "\n".join(out) if len(out) > 2 else ""


def lm_eval_table(recs: list[dict]) -> str:
    return table(
        ["model", "target", "achieved", "lm-eval word ppl", "lm-eval byte ppl", "lm-eval token ppl (same NLL)",
         "tokens/word", "hf-compress ppl", "lm-eval wall s", "ppl wall s"],
        [[r["model"], f"{r['target_ratio']:.1%}", f"{r['achieved_ratio']:.1%}", f"{r['word_perplexity']:.2f}",
          f"{r['byte_perplexity']:.4f}", f"{r['lm_eval_token_perplexity']:.2f}", f"{r['tokens'] / r['words']:.3f}",
          f"{r['ppl']:.2f}", f"{r['lm_eval_wall_s']:.0f}", f"{r['ppl_wall_s']:.0f}"] for r in recs])


# ----------------------------------------------------------------------------------------------------- pruning
def pruning_rows(data: dict) -> list[list[str]]:
    rows = []
    for net in data["networks"]:
        name = f"{net['arch']}/{net['width_divisor']}"
        for r in net["rows"]:
            kind = r["model"].split(" ", 1)[1]
            if kind == "class-aware":
                its = r.get("iterations", [])
                kept = max((i["iteration"] for i in its if i["macs"] == r["macs"]), default=None)
                kind += f" (iteration {kept} kept; stopped: {r.get('stop_reason', '')})" if kept is not None else ""
            elif kind == "L1-norm":
                kind += f", same MACs, {r.get('retrain_epochs')} retraining epochs"
            rows.append([f"{name} {kind}", f"{r['params'] / 1e6:.3f}M", millions(r["macs"]), pct(r["test_accuracy"], 2),
                         pct(r["macs_reduction"], 1) if "macs_reduction" in r else "-",
                         f"{100 * r['accuracy_change']:+.2f}" if "accuracy_change" in r else "-"])
    return rows


def pruning_section(files: dict) -> str:
    main = {k: v for k, v in files.items() if "regularizers" not in k}
    if not main:
        return ""
    any_run = next(iter(main.values()))
    a = any_run["args"]
    out = ["## Class-aware pruning: reduced scale (CPU)", ""]
    out.append(
        f"**Reduced scale on a 2-core CPU** (device recorded: `{any_run['device']}`). `benchmarks/bench_pruning.py`, the same code path "
        f"as the full protocol, but narrow networks (width divided by the factor after the name: ResNet-20/"
        f"{main_arg(main, 'resnet20', 'width_divisor')}, VGG-16/{main_arg(main, 'vgg16', 'width_divisor')}), "
        f"{any_run['train_images']:,} training images (+{any_run['val_images']:,} held out for validation, seed 2023), "
        f"{any_run['test_images']:,} test images, {a['epochs']} baseline epochs, at most {a['iterations']} class-aware "
        f"iterations of {a['retrain_epochs']} retraining epochs, and a floor {100 * a['floor_drop']:.0f} points under "
        f"the baseline's validation accuracy. The L1-norm baseline is pruned to the closest MACs at or above "
        f"class-aware's and retrained for as many epochs as the chosen class-aware model.")
    base_accs = [n["rows"][0]["test_accuracy"] for d in main.values() for n in d["networks"]]
    out.append(f"Baselines reach only {span(base_accs, pct)} test accuracy: these runs show that the pipeline runs end "
               "to end and what it measures, not the method's quality at full scale.")
    out.append("")
    groups = [("L1 regulariser (the default)", [k for k in main if "_l1_" in k and "double" not in k]),
              ("Orthogonality regulariser", [k for k in main if "_l1" not in k]),
              ("Orthogonality regulariser, L1-norm baseline given a larger retraining budget (an earlier run)",
               [k for k in main if "double_budget" in k])]
    header = ["model", "params", "MACs", "test acc", "MACs removed", "acc change (points)"]
    align = ["---", "---:", "---:", "---:", "---:", "---:"]
    diffs = {}
    for title, keys in groups:
        if not keys:
            continue
        out.append(f"{title}: " + ", ".join(f"`{k}`" for k in keys))
        out.append("")
        out.append(table(header, [row for k in keys for row in pruning_rows(main[k])], align))
        out.append("")
        if "larger" in title:
            continue
        for k in keys:
            for net in main[k]["networks"]:
                ca = next(r for r in net["rows"] if r["model"].endswith("class-aware"))
                l1 = next(r for r in net["rows"] if r["model"].endswith("L1-norm"))
                diffs[(title.split(" ")[0], net["arch"])] = ca["test_accuracy"] - l1["test_accuracy"]
    if diffs:
        n = any_run["test_images"]
        se = std_error(0.37, n) * math.sqrt(2)
        out.append("Class-aware minus L1-norm test accuracy: " + ", ".join(
            f"{arch} with the {reg} regulariser {100 * v:+.1f} points" for (reg, arch), v in diffs.items())
                   + f". With {n:,} test images the standard error of a difference of two accuracies near these is "
                     f"about {100 * se:.1f} points, so none of these differences is significant. The uniform L1 ratio "
                     "steps coarsely on such narrow layers, so L1-norm models sometimes keep a few percent more MACs.")
        out.append("")
    reg = files.get("pruning_regularizers_cpu_reduced.json")
    if reg:
        r0 = reg["regularizers"]
        out.append(f"Regulariser choice (`pruning_regularizers_cpu_reduced.json`): {reg['arch']}/"
                   f"{reg['args']['width_divisor']}, {reg['args']['epochs']} epochs, importance from "
                   f"{reg['args']['images_per_class']} images per class.")
        out.append("")
        out.append(table(["regulariser", "test acc", f"filters important for <= 1 class (of {r0[0]['prunable_filters']})",
                          "mean classes per filter"],
                         [[r["regularizer"], pct(r["test_accuracy"], 2), r["important_for_at_most_1_class"],
                           f"{r['mean_classes_per_filter']:.2f}"] for r in r0], ["---", "---:", "---:", "---:"]))
        out.append("")
        by = {r["regularizer"]: r for r in r0}
        if {"none", "orthogonal", "l1"} <= set(by):
            out.append(
                f"Orthogonality made filters slightly less class-specific ({by['orthogonal']['mean_classes_per_filter']:.2f} "
                f"classes per filter against {by['none']['mean_classes_per_filter']:.2f}) and cost accuracy "
                f"({pct(by['orthogonal']['test_accuracy'], 1)} against {pct(by['none']['test_accuracy'], 1)}). L1 made "
                f"them no more specific than no regulariser, at {pct(by['l1']['test_accuracy'], 1)}. L1 is therefore "
                "the default of `prune`, on a weak basis (one seed, this scale); `--compare-regularizers` repeats the "
                "comparison at full scale.")
    return "\n".join(out)


def main_arg(main: dict, arch: str, key: str):
    for d in main.values():
        for n in d["networks"]:
            if n["arch"] == arch:
                return n[key]
    return "?"


# ----------------------------------------------------------------------------------------------------- early exit
def exit_rows(data: dict) -> list[list[str]]:
    rows = []
    for a in data["archs"]:
        base = a["base"]
        rows.append([a["arch"], "plain network (before heads)", "-", pct(base["test_accuracy"], 2), "-", "-",
                     millions(base["macs"]), "-", "-", "-", "-", "-", "-"])
        for rule, r in a["rules"].items():
            for t in r["tolerances"]:
                hist = ", ".join(f"{k} {v:.0%}" for k, v in t["exit_histogram"].items())
                rows.append([a["arch"], rule, f"{t['tolerance']:g}", pct(t["test_accuracy_full"], 2),
                             pct(t["test_accuracy"], 2), f"{100 * (t['test_accuracy'] - t['test_accuracy_full']):+.2f}",
                             millions(t["macs_full"]), millions(t["mean_macs"]), pct(t["macs_reduction"], 1),
                             f"{t['throughput_full']:.0f}", f"{t['throughput']:.0f}", f"{t['speedup']:.2f}x", hist])
    return rows


def early_exit_section(files: dict) -> str:
    if not files:
        return ""
    out = ["## Early exit with class exclusion: reduced scale (CPU)", ""]
    out.append("`benchmarks/bench_early_exit.py` on CIFAR-10, **reduced scale**: random subsets of the training and "
               "test splits, the plain network trained for a few epochs, then heads attached at the middle and end of "
               "every stage and trained jointly, separately for each rule. `resnet20` is the CIFAR ResNet-20 "
               "(option-A shortcuts), standing in for ResNet-56; `hf-resnet18` is transformers' "
               "`ResNetForImageClassification` ResNet-18 layout (7x7 stride-2 stem + max pool) at 32x32. Throughput: "
               "the best of alternating rounds (exits on / every exit off) over the test batches.")
    out.append("")
    header = ["arch", "rule", "tolerance", "test acc full", "test acc early exit", "Δ acc (points)", "MACs full",
              "mean MACs", "MACs saved", "img/s full", "img/s early exit", "speedup", "exit histogram"]
    for name, d in files.items():
        a = d["args"]
        tag = name[:-5]
        out.append(f"`{name}`: {d['device']}; {d['train_samples']:,} train / {d['val_samples']:,} validation (threshold "
                   f"search) / {d['test_samples']:,} test images; {a['pretrain_epochs']} epochs plain, "
                   f"{a['joint_epochs']} joint; throughput at batch {a['throughput_batch']}, best of {a['speed_rounds']} "
                   f"rounds x {a['throughput_batches']} batches"
                   + ("; rerun with `--reuse` on the same trained models" if a.get("reuse") else "")
                   + (f"; {CONTEXT[tag]}" if tag in CONTEXT else "") + ".")
        out.append("")
        out.append(table(header, exit_rows(d)))
        out.append("")
    out += exit_analysis(files)
    return "\n".join(out)


def exit_analysis(files: dict) -> list[str]:
    out = ["What this shows:", ""]
    bases = {name: a["base"]["test_accuracy"] for name, d in files.items() for a in d["archs"]}
    out.append(f"- These networks are far from trained ({span(list(bases.values()), pct)} test accuracy), so the "
               "numbers measure the machinery, not the method.")

    def tol(arch, rule):
        return [t for d in files.values() for a in d["archs"] if a["arch"] == arch
                for t in a["rules"].get(rule, {}).get("tolerances", [])]

    r20_ce, r20_cf = tol("resnet20", "class_exclusion"), tol("resnet20", "confidence")
    if r20_ce and r20_cf:
        out.append(f"- ResNet-20: class exclusion saved {span([t['macs_reduction'] for t in r20_ce], lambda x: pct(x, 1))} "
                   f"of the MACs; the confidence baseline saved {span([t['macs_reduction'] for t in r20_cf], lambda x: pct(x, 1))} "
                   f"at {span([100 * (t['test_accuracy_full'] - t['test_accuracy']) for t in r20_cf], lambda x: f'{x:.1f}')} "
                   "test points. The baseline is ahead at this scale: the betas the search picked "
                   f"({span([b for t in r20_ce for b in t['thresholds']], lambda x: f'{x:.2f}')}) exclude classes, but "
                   "after so little joint training the sigmoid scores stay high for several classes and almost no "
                   "sample gets down to one.")
        worst = max(r20_ce, key=lambda t: t["test_accuracy_full"] - t["test_accuracy"])
        out.append(f"- The search returns the visited setting with the fewest MACs, so at this scale it can trade "
                   f"{100 * (worst['test_accuracy_full'] - worst['test_accuracy']):.2f} test points for "
                   f"{pct(worst['macs_reduction'], 1)} fewer MACs (ResNet-20, tolerance {worst['tolerance']:g}).")
    h_ce, h_cf = tol("hf-resnet18", "class_exclusion"), tol("hf-resnet18", "confidence")
    if h_ce and h_cf:
        both = h_ce + h_cf
        out.append(f"- hf-resnet18 is near chance, so the search lets nearly every sample leave at the first exits; "
                   f"both rules cut MACs by {span([t['macs_reduction'] for t in both], pct)} and lose "
                   f"{span([100 * (t['test_accuracy_full'] - t['test_accuracy']) for t in both], lambda x: f'{x:.1f}')} "
                   f"test points. Class-exclusion betas reach the grid's cap of "
                   f"{max(b for t in h_ce for b in t['thresholds']):.2f}.")
        out.append(f"- The batched exit gives a real wall-clock gain when many samples leave early (hf-resnet18: "
                   f"{span([t['speedup'] for t in h_ce], lambda x: f'{x:.1f}x')} for class exclusion at "
                   f"{span([t['macs_reduction'] for t in h_ce], pct)} fewer MACs, "
                   f"{span([t['speedup'] for t in h_cf], lambda x: f'{x:.1f}x')} for confidence), and none beyond the "
                   f"timing noise when few do (ResNet-20, at most {pct(max(t['macs_reduction'] for t in r20_ce + r20_cf), 1)} "
                   f"fewer MACs: {span([t['speedup'] for t in r20_ce + r20_cf], lambda x: f'{x:.2f}x')}). The spread "
                   "between rows with identical exits shows that noise on a shared 2-core machine.")
    return out


# ----------------------------------------------------------------------------------------------------- CNN cifar-cpu
def demoted(markdown: str) -> str:
    """A stage script's own tables, with their headings moved two levels down (under this README's sections)."""
    return re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", markdown.strip(), flags=re.M)


def cnn_summary_table(network: str, entries: dict) -> str:
    """`cnn_cpu_summary.json`'s entries of one network as a table: one row per figure, its mean and each seed's value
    (`<key>` holds the mean, `<key>_per_seed` the seeds)."""
    seeds = sorted({seed for key, value in entries.items() if key.endswith("_per_seed") for seed in value})

    def cell(value) -> str:
        if not isinstance(value, (int, float)):
            return "-" if value is None else str(value)
        # Fractions (accuracies, reductions) as percentages; speedups as factors.
        return pct(value, 2) if 0 <= value <= 1 else f"{value:.2f}x"

    rows = [[f"`{key}`", cell(value), *(cell(entries.get(f"{key}_per_seed", {}).get(seed)) for seed in seeds)]
            for key, value in entries.items() if not key.endswith("_per_seed")]
    return f"Summary (`cnn_cpu_summary.json`), {network}:\n\n" + table(
        ["figure", "mean", *(f"seed {seed}" for seed in seeds)], rows)


def _state(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def prune_progress(work: Path, finished: dict | None) -> str:
    """The finished steps of stage "prune" as its work folder holds them, for the seeds whose results the stage has
    not written yet (it writes a seed's rows to `cnn_cpu_prune.json` once its three methods have finished): each
    class-aware iteration, then the L1-norm and plain Taylor baselines pruned to the chosen iteration's MACs."""
    done = {row["seed"] for row in (finished or {}).get("rows", [])}
    rows, notes = [], []
    for folder in sorted(work.glob("prune-resnet20-seed*")):
        seed = int(folder.name.removeprefix("prune-resnet20-seed"))
        base = _state(folder / "baseline" / "state.json").get("row")
        if seed in done or base is None:
            continue

        def cells(method: str, step, row: dict, floor: str) -> list:
            return [seed, method, step, pct(1 - row["macs"] / base["macs"], 1),
                    pct(1 - row["params"] / base["params"], 1), pct(row["val_accuracy"], 2), floor,
                    pct(row["test_accuracy"], 2), f"{100 * (row['test_accuracy'] - base['test_acc']):+.2f} pt"]

        rows.append([seed, "baseline", "-", "-", "-", pct(base["val_acc"], 2), "-", pct(base["test_acc"], 2), "-"])
        ca = _state(folder / "class_aware" / "state.json")
        floor = ca.get("settings", {}).get("config", {}).get("accuracy_floor")
        for row in ca.get("rows", [])[1:]:
            rows.append(cells("class-aware", row["iteration"], row,
                              f"{pct(floor, 2)} ({'met' if row['meets_floor'] else 'missed'})"))
        if ca.get("stop_reason"):
            notes.append(f"seed {seed}: class-aware pruning stopped ({ca['stop_reason']}); the result is iteration "
                         f"{ca['best_iteration']}, the smallest that meets the validation floor.")
        elif ca.get("rows"):
            notes.append(f"seed {seed}: class-aware pruning is still running.")
        for method, label in (("l1", "L1-norm"), ("taylor", "plain Taylor")):
            # At the class-aware result's MACs, then at those of later iterations (the comparison beyond the floor).
            for step in [folder / method, *sorted(folder.glob(f"{method}-iter*"))]:
                state = _state(step / "state.json")
                if state.get("row"):
                    where = "" if step.name == method else f" at iteration {int(step.name.split('-iter')[1])}"
                    rows.append(cells(label + where, f"{state['settings']['epochs']} epochs", state["row"], "-"))
    if len(rows) == 0:
        return ""
    return "\n".join([
        "### Stage \"prune\" in progress", "",
        "The stage writes a seed's results (`cnn_cpu_prune.json`, the pipeline accuracies with bootstrap intervals, "
        "the checkpoints) once its three methods have finished. Until then, these are the finished steps its work "
        "folder (`benchmarks/work/cnn_cpu/`) holds: validation and test accuracy by `evaluate_accuracy`, the test "
        "accuracy's change in points and the MACs and parameters removed, both against the baseline's.", "",
        table(["seed", "method", "iteration / retraining", "MACs removed", "params removed", "val acc", "val floor",
               "test acc", "test change"], rows), "",
        *[f"- {note}" for note in notes],
    ]).rstrip()


def cnn_cpu_section(files: dict) -> str:
    if not files:
        return ""
    out = ["## CNN, protocol \"cifar-cpu\" (CPU)", ""]
    base = files.get("cnn_cpu_baseline.json")
    if base:
        proto = base.get("protocol", {})
        if isinstance(proto, dict):
            out.append("Protocol: " + ", ".join(f"{k} {v}" for k, v in proto.items()) + ".")
            out.append("")
        rows = base.get("rows", [])
        out.append(table(["seed", "test acc", "val acc", "precision", "params", "MACs", "epochs logged", "seconds",
                          "device", "note"],
                         [[r.get("seed"), pct(r["test_acc"], 2) if "test_acc" in r else "-",
                           pct(r["val_acc"], 2) if "val_acc" in r else "-", r.get("precision", "-"),
                           f"{r['params'] / 1e6:.3f}M" if "params" in r else "-",
                           millions(r["macs"]) if "macs" in r else "-", len(r.get("train_loss", [])),
                           f"{r['seconds_this_invocation']:.0f}" if "seconds_this_invocation" in r else "-",
                           r.get("device", "-"), r.get("note") or "-"] for r in rows]))
        out.append("")
        if any(r.get("note") for r in rows):
            out.append("Rows with a note were measured under the condition it names.")
            out.append("")
    reference = files.get("cnn_cpu_reference.json")
    if reference:
        out.append(reference_check(reference))
        out.append("")
    summary = files.get("cnn_cpu_summary.json")
    if summary:
        for network, entries in summary.get("networks", {}).items():
            out += [cnn_summary_table(network, entries), ""]
    for name in files:
        if name in ("cnn_cpu_baseline.json", "cnn_cpu_summary.json", "cnn_cpu_reference.json",
                    "cnn_cpu_exit_profile.json"):  # the profile goes after the exits stage it explains
            continue
        # A stage script writes its own tables beside its JSON: they go here with their headings moved down.
        tables = RESULTS / name.replace(".json", ".md")
        if tables.is_file():
            out.append(demoted(tables.read_text()))
            out.append("")
            if name == "cnn_cpu_exits.json":
                out += [exit_stops_analysis(files[name]), ""]
                ablation = {p.parent.name: json.loads(p.read_text())
                            for p in sorted(RESULTS.glob("cnn_cpu_exits_pool*/cnn_cpu_exits.json"))}
                out += [exit_head_ablation(ablation, files[name]), ""]
                profile = RESULTS / "cnn_cpu_exit_profile.md"
                if profile.is_file():
                    out += [demoted(profile.read_text()), ""]
                latency = RESULTS / "cnn_cpu_exits_latency" / "cnn_cpu_exits.json"
                if latency.is_file():
                    out += [exit_cost_comparison(json.loads(latency.read_text()), files[name]), ""]
        else:
            out.append(f"`{name}` is stored but not summarised here.")
    progress = prune_progress(CNN_CPU_WORK, files.get("cnn_cpu_prune.json"))
    if progress:
        out += ["", progress]
    return "\n".join(out)


def head_accuracies(exits: dict, rule: str, seeds=None) -> list[float]:
    """Each exit head's validation accuracy alone under `rule`, the mean over `seeds` (default: every seed)."""
    per_seed = [acc[rule] for seed, acc in exits["head_val_accuracy"].items() if seeds is None or int(seed) in seeds]
    return [sum(values) / len(per_seed) for values in zip(*per_seed)]


def exit_stops_analysis(exits: dict, tolerance: float = 0.005) -> str:
    """Where the test images stop under each rule at `tolerance` (mean over seeds), and how accurate each exit head
    is alone: the figures that explain how many MACs a rule can save on this network."""
    rows = [r for r in exits["rows"] if r["tolerance"] == tolerance]
    if not rows:
        return ""
    positions = exits["exit_positions"]
    # Exits before the last stage: the MACs a stop there saves are large; a stop at the last stage's exit saves little.
    early = [p for p in positions if not p.startswith(positions[-1].split(".")[0])]
    parts, shares = [], {}
    for rule in ("class_exclusion", "confidence"):
        mine = [r for r in rows if r["rule"] == rule]
        if not mine:
            continue
        share = shares[rule] = sum(sum(r["exit_histogram"].get(p, 0.0) for p in early) for r in mine) / len(mine)
        last = sum(r["exit_histogram"].get(positions[-1], 0.0) for r in mine) / len(mine)
        excluded = sum(r["test_errors"]["lost_to_excluded_classes"] for r in mine) / len(mine)
        heads = head_accuracies(exits, rule)
        parts.append(f"{rule.replace('_', ' ')} stops {pct(share, 1)} of the test images at the exits before "
                     f"{positions[-1].split('.')[0]} ({', '.join(early)}) and {pct(last, 1)} at {positions[-1]}"
                     + (f", and loses {excluded:.0f} test images a run to classes excluded too early"
                        if rule == "class_exclusion" else "")
                     + f"; its heads alone reach {', '.join(pct(a) for a in heads)} validation accuracy")
    text = f"**Where the images stop** (tolerance {tolerance}, mean over seeds): " + "; ".join(parts) + "."
    if len(shares) == 2 and shares["class_exclusion"] < shares["confidence"]:
        text += (" Class exclusion stops fewer images early: its stop needs every class but one ruled out by an "
                 "early head, while one confident softmax is enough for the confidence rule.")
    return text


def exit_cost_comparison(latency: dict, protocol: dict) -> str:
    """The thresholds searched for the least measured time (`--cost latency`, folder `cnn_cpu_exits_latency/`)
    against the protocol's MAC search, on the same trained models: per rule and tolerance, the means over the seeds
    both ran of the test MACs saved, the accuracy change against the full network and the speedup each run measured
    against its own full network."""
    seeds = {r["seed"] for r in latency["rows"]} & {r["seed"] for r in protocol["rows"]}
    rows, gains = [], []
    for rule in latency["rules"]:
        for tolerance in latency["tolerances"]:
            pair = []
            for rep in (protocol, latency):
                mine = [r for r in rep["rows"] if r["rule"] == rule and r["tolerance"] == tolerance and r["seed"] in seeds]
                if not mine:
                    break
                n = len(mine)
                pair.append((sum(r["macs_reduction"] for r in mine) / n,
                             100 * sum(r["test_acc"] - r["test_acc_full"] for r in mine) / n,
                             sum(r["speedup"] for r in mine) / n))
            if len(pair) < 2:
                continue
            (m_macs, m_acc, m_speed), (l_macs, l_acc, l_speed) = pair
            gains.append(l_speed - m_speed)
            rows.append([rule.replace("_", " "), tolerance, f"{pct(m_macs, 1)} / {m_acc:+.2f} / {m_speed:.2f}x",
                         f"{pct(l_macs, 1)} / {l_acc:+.2f} / {l_speed:.2f}x"])
    if not rows:
        return ""
    note = f" Note: {latency['note']}" if latency.get("note") else ""
    return "\n".join([
        "### Threshold search for time instead of MACs", "",
        (f"The same trained models (seeds {', '.join(map(str, sorted(seeds)))}), thresholds searched for the fewest "
         "MACs (the protocol's run) and for the least time per image measured on this machine before the search "
         "(`--cost latency`: every unit, head and the final classifier timed on validation images). Each cell: test "
         "MACs saved / test accuracy change against the full network (points) / speedup at batch 256, measured by "
         "each run against its own full network in that run (the two runs were timed separately; mean over seeds). "
         "Tables: "
         f"[cnn_cpu_exits_latency/](cnn_cpu_exits_latency/cnn_cpu_exits.md).{note}"), "",
        table(["rule", "tolerance", "search for MACs", "search for time"], rows), "",
        (f"Searching for time changes the speedup by {min(gains):+.2f}x to {max(gains):+.2f}x (mean "
         f"{sum(gains) / len(gains):+.2f}x)."),
    ])


def exit_head_ablation(reports: dict[str, dict], protocol: dict | None = None, tolerance: float = 0.005) -> str:
    """Exit-head capacity: the exits stage rerun with heads of several pool sizes (`--exit-pool-size`, each run in
    its own `cnn_cpu_exits_pool<N>[_joint]/` folder) and, for reference, the protocol's own run on the same seeds.
    One row per run and rule: each head's validation accuracy (mean over the seeds) and the MACs saved at
    `tolerance`; then, per training mode, how the saving moves from the smallest to the largest heads."""
    runs = sorted(reports.items(), key=lambda kv: (kv[1]["budget"]["training"], kv[1]["budget"]["exit_pool_size"]))
    if not runs:
        return ""
    seeds = {r["seed"] for _, rep in runs for r in rep["rows"]}
    if protocol:
        runs.append(("the protocol's run", protocol))
    positions = runs[0][1]["exit_positions"]
    rows, saved = [], {}
    for folder, rep in runs:
        budget = rep["budget"]
        pool, training = budget["exit_pool_size"], budget["training"]
        for rule in rep["rules"]:
            mine = [r for r in rep["rows"] if r["rule"] == rule and r["tolerance"] == tolerance and r["seed"] in seeds]
            if not mine:
                continue
            heads = head_accuracies(rep, rule, {r["seed"] for r in mine})
            n = len(mine)
            saved[(training, pool, rule)] = sum(r["macs_reduction"] for r in mine) / n
            where = f"[{folder}/]({folder}/cnn_cpu_exits.md)" if folder in reports else folder
            rows.append([f"{pool}x{pool}", f"{training}, {budget['epochs']} epochs",
                         ", ".join(sorted({str(r["seed"]) for r in mine})), rule.replace("_", " "),
                         *[pct(a, 1) for a in heads], pct(saved[(training, pool, rule)], 1),
                         f"{100 * sum(r['test_acc'] - r['test_acc_full'] for r in mine) / n:+.2f}", where])
    largest = max(rep["budget"]["exit_pool_size"] for _, rep in runs)
    out = ["### Exit-head ablation: pooled size of the exit heads", "",
           (f"The exits stage rerun with exit heads of different pooled sizes (adaptive average pooling to NxN, then "
            f"one linear layer): each head's validation accuracy alone, and the mean test MACs saved at tolerance "
            f"{tolerance} with the test accuracy change against the full network (\"frozen\": the heads trained "
            f"alone on the baseline; \"joint\": with the backbone, as the protocol). Heads are cheap at every size "
            f"here (at most {largest ** 2} x 64 x 10 multiply-adds per head, the network has 40.6M), so what a larger "
            f"head buys is accuracy."), "",
           table(["pool", "training", "seeds", "rule", *positions, "MACs saved", "Δ test acc vs full (points)",
                  "tables"], rows)]
    for training in sorted({key[0] for key in saved}):
        pools = sorted({key[1] for key in saved if key[0] == training})
        low, high = pools[0], pools[-1]
        if len(pools) < 2 or not all((training, p, "class_exclusion") in saved for p in (low, high)):
            continue
        text = (f"Trained {training}, class exclusion saves {pct(saved[(training, low, 'class_exclusion')], 1)} of "
                f"the MACs with {low}x{low} heads and {pct(saved[(training, high, 'class_exclusion')], 1)} with "
                f"{high}x{high} heads")
        if all((training, p, "confidence") in saved for p in (low, high)):
            text += (f"; the confidence rule {pct(saved[(training, low, 'confidence')], 1)} and "
                     f"{pct(saved[(training, high, 'confidence')], 1)}")
        out += ["", text + "."]
    return "\n".join(out)


def cnn_cpu_exit_rows(exits: dict | None, tolerance: float = 0.005) -> list[list[str]]:
    """Summary rows of stage "exits" of protocol "cifar-cpu": class exclusion against confidence exits at
    `tolerance`, mean over the seeds measured."""
    if not exits or exits.get("reduced"):
        return []
    rows = [r for r in exits["rows"] if r["tolerance"] == tolerance]
    if not rows:
        return []

    def mean(rule: str, key: str) -> float:
        values = [r[key] for r in rows if r["rule"] == rule]
        return sum(values) / len(values)

    seeds = sorted({r["seed"] for r in rows})
    return [[f"Early exit, class exclusion, tolerance {tolerance}",
             f"ResNet-20 (full width, {exits['budget']['training']} exit training), CIFAR-10, CPU",
             (f"{pct(mean('class_exclusion', 'macs_reduction'), 1)} fewer MACs, "
              f"{mean('class_exclusion', 'speedup'):.2f}x at batch {exits['budget']['throughput_batch']}, acc "
              f"{pct(mean('class_exclusion', 'test_acc_full'), 1)} -> {pct(mean('class_exclusion', 'test_acc'), 1)}"),
             (f"max-softmax exits: {pct(mean('confidence', 'macs_reduction'), 1)} fewer MACs, "
              f"{mean('confidence', 'speedup'):.2f}x, acc {pct(mean('confidence', 'test_acc'), 1)}"),
             f"protocol \"cifar-cpu\", {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"]]


def cnn_cpu_prune_rows(prune: dict | None) -> list[list[str]]:
    """The summary row of stage "prune" of protocol "cifar-cpu": class-aware pruning against L1-norm and plain Taylor
    pruning at its MACs and retraining epochs, means over the seeds whose three methods are all measured."""
    if not prune or prune.get("reduced"):
        return []
    by_seed: dict[int, dict[str, dict]] = {}
    for row in prune["rows"]:
        by_seed.setdefault(row["seed"], {})[row["method"]] = row
    seeds = sorted(seed for seed, rows in by_seed.items()
                   if {"baseline", "class_aware", "l1", "taylor"} <= set(rows))
    if not seeds:
        return []

    def mean(method: str, key: str) -> float:
        return sum(by_seed[seed][method][key] for seed in seeds) / len(seeds)

    return [["Class-aware pruning (L1 regulariser)", "ResNet-20 (full width), CIFAR-10, CPU",
             (f"{pct(mean('class_aware', 'macs_reduction'), 1)} fewer MACs, acc {pct(mean('baseline', 'test_acc'), 1)} "
              f"-> {pct(mean('class_aware', 'test_acc'), 1)}"),
             (f"at the same MACs and epochs: L1-norm acc {pct(mean('l1', 'test_acc'), 1)}, plain Taylor acc "
              f"{pct(mean('taylor', 'test_acc'), 1)}"),
             f"protocol \"cifar-cpu\", {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"]]


# Accuracy gap (points) within which the pipeline and the independent reference count as equal at this length.
REFERENCE_NOISE_POINTS = 1.0


def reference_check(report: dict) -> str:
    """The cross-check of the training pipeline against an independent implementation (`cnn_cpu_reference.py`)."""
    rows = report.get("rows", [])
    out = [("**Pipeline cross-check** (`benchmarks/cnn_cpu_reference.py`): the same ResNet-20, hyper-parameters and "
            "short schedule, trained once through hf-compress and once by an independent minimal implementation "
            "(PIL decoding, per-image augmentation, a ResNet-20 written out separately, a plain loop)."), ""]
    out.append(table(["arm", "epochs", "seed", "test acc", "val acc", "train acc (no augmentation)", "note"],
                     [[r["arm"], r["epochs"], r["seed"], pct(r["test_acc"], 2), pct(r["val_acc"], 2),
                       pct(r["train_acc_no_aug"], 2), r.get("note") or "-"] for r in rows]))
    by_arm = {(r["epochs"], r["seed"], r["arm"]): r for r in rows}
    for (epochs, seed, arm), ours in by_arm.items():
        ref = by_arm.get((epochs, seed, "reference"))
        if arm != "hf-compress" or ref is None:
            continue
        gaps = {k: 100 * (ours[k] - ref[k]) for k in ("test_acc", "val_acc")}
        equal = all(abs(g) <= REFERENCE_NOISE_POINTS for g in gaps.values())
        out += ["", (f"At {epochs} epochs (seed {seed}) hf-compress minus reference: test {gaps['test_acc']:+.2f}, "
                     f"validation {gaps['val_acc']:+.2f} points: "
                     + ("equal within run-to-run noise, so the training pipeline shows no defect; the baseline's "
                        "shortfall comes from the recipe or the data." if equal else
                        f"a gap beyond {REFERENCE_NOISE_POINTS:g} point: the pipeline differs from the reference."))]
    data = report.get("data", {})
    if data:
        described = "; ".join(f"{split}: {', '.join(d['formats'])}, quality {', '.join(map(str, d['jpeg_quality']))}, "
                              f"chroma {', '.join(d['chroma_subsampling'])}" for split, d in data.items())
        out += ["", (f"The stored CIFAR-10 images ({described}; read from the first {next(iter(data.values()))['images_checked']} "
                     "files of each split) are lossy re-encodings of the 32x32 originals, with colour at half "
                     "resolution; published ResNet-20 figures (91-92%) are for the original PNG images and "
                     "160-200 epochs.")]
    return "\n".join(out)


def save_dtype_section(report: dict | None) -> str:
    if not report:
        return ""
    rows = report["rows"]
    return "\n".join([
        "### Saved dtype", "",
        (f"SmolLM2-135M-Instruct at {report['ratio']:.0%} (protocol \"quick\"), the same conversion saved in float32 "
         "and in bfloat16 (the source's dtype, the default), each measured from its saved files with float32 compute "
         "(`benchmarks/bench_save_dtype.py`)."), "",
        table(["saved as", "weights (MB)", "WikiText-2 quick ppl", "change vs float32"],
              [[r["save_dtype"], f"{r['weights_mb']:.1f}", ppl(r["wikitext2_ppl"]),
                f"{100 * r['relative_change']:+.2f}%"] for r in rows]),
        "",
        f"bfloat16 within 1% of float32: {'yes' if report['within_1_percent'] else 'no'}.",
    ])


# The healing targets at the 262,144-token budget (WikiText-2 quick; C4 against dense; chat and zero-shot at 20%).
HEAL_BUDGET = 262144
# The conversion's default group size (`BasisSharingConfig.group_size`: layers that share one basis); rows and
# students written before they recorded theirs used it.
GROUP_SIZE = 2
WIKITEXT_TARGETS = {0.2: 45.0, 0.3: 65.0}
CHAT_TARGET_RATIO, CHAT_NON_EMPTY_TARGET = 0.2, 0.9
ZEROSHOT_TARGET_RATIO = 0.2
# Healing options that change only the data (the teacher's chat text and free text), as in bench_quick_heal.py.
DATA_OPTIONS = {"chat_fraction", "chat_batch_size", "free_text_fraction"}
# `convert --heal-tokens 262144` at 20% as a user runs it: with the data a chat source gets by default (HealConfig's
# chat_fraction "auto" for a tokenizer with a chat template), in under this many minutes.
PIPELINE_RATIO, PIPELINE_CHAT_SHARE, PIPELINE_MINUTES = 0.2, 0.25, 40.0
# The run the ablations change one thing of: 20%, 131,072 tokens, the KL on the factors, plain text.
ABLATION_BASE = "r0.2-131k"
# The chat exchange shown in the READMEs: always this prompt of benchmarks/chat_prompts.json (the first), never one
# picked by its answers.
EXCHANGE_PROMPT = 0


# The training settings whose rows count as main rows: the protocol's base (the KL alone, 4 sequences a step) and
# the library's default (`HealConfig`: the KL plus the cross-entropy, 2 a step); both on the factors at lr 1e-4.
MAIN_TRAINING = (("kl", 4), ("kl+lm", 2))
# Healing options added after the first rows were written, with the value those rows trained with (and the library
# still defaults to): a row with any other value is not a main row.
LATER_HEAL_OPTIONS = {"hidden_weight": 0.0, "balance_factors": False, "free_text_fraction": 0.0, "block_tokens": 0,
                      "dtype": "auto"}


def main_training(options: dict) -> bool:
    """Healing options (whole, or only those a row changes from the protocol's base) of a main setting."""
    return ((options.get("loss", "kl"), options.get("batch_size", 4)) in MAIN_TRAINING
            and options.get("trainable", "factors") == "factors" and options.get("lr", 1e-4) == 1e-4
            and all(options.get(key, value) == value for key, value in LATER_HEAL_OPTIONS.items()))


def conversion_changes(r: dict) -> list[str]:
    """How the conversion under a row (or a student of `quick_heal_students.json`) differs from the default one
    (sequential calibration on text alone, bases shared by `GROUP_SIZE` layers): [] for the default."""
    group_size = r.get("group_size", GROUP_SIZE)
    return [change for change in (
        None if r.get("sequential", True) else "no sequential calibration",
        f"calibration {pct(r['calib_chat_fraction'])} chat text" if r.get("calib_chat_fraction") else None,
        None if group_size == GROUP_SIZE else f"group size {group_size}") if change]


def is_main_heal(r: dict) -> bool:
    """A row healed as the main rows are: a `MAIN_TRAINING` setting on the factors, the default conversion, the
    262,144-token budget."""
    return (r["budget_tokens"] == HEAL_BUDGET and main_training(r.get("heal_options", {}))
            and not conversion_changes(r))


def chat_share(r: dict) -> float:
    """The share of the teacher's chat text in a row's healing data (0 for rows measured before it existed)."""
    return float((r.get("heal_options") or {}).get("chat_fraction") or 0.0)


# Conversations the teacher wrote at a time for rows that name no `chat_batch_size` (the library's default then).
EARLIER_CHAT_BATCH = 16


def mix_tag(r: dict) -> str:
    """" (25% chat text, 64 at a time)" for a row healed partly on the teacher's chat text (which depends on how
    many conversations the teacher wrote at a time), "" for plain text."""
    if not chat_share(r):
        return ""
    batch = (r.get("heal_options") or {}).get("chat_batch_size", EARLIER_CHAT_BATCH)
    return f" ({pct(chat_share(r))} chat text, {batch} at a time)"


def healed_rows(rows: list[dict], ratio: float) -> list[dict]:
    """The chat or zero-shot rows of the models healed at `ratio` as the main rows are (the full budget, a
    `MAIN_TRAINING` setting, the default conversion), whatever their data mix; per model the row with the most items
    per set."""
    found: dict[str, dict] = {}
    for r in rows:
        options = r.get("heal_options") or {}
        if (r["kind"] == "healed" and math.isclose(r["ratio"], ratio) and not conversion_changes(r)
                and r.get("budget_tokens") == HEAL_BUDGET
                and set(options) <= DATA_OPTIONS | {"loss", "batch_size"} and main_training(options)):
            if r["model"] not in found or r.get("limit", 0) > found[r["model"]].get("limit", 0):
                found[r["model"]] = r
    return sorted(found.values(), key=chat_share)


def bench_row(rows: list[dict], ratio: float, kind: str) -> dict | None:
    """The chat or zero-shot row of the dense model, the unhealed student (sequential calibration) at `ratio`, or
    the model healed as the main rows are at `ratio` (zero-shot: the row with the most items per set)."""
    found = [r for r in rows if r["kind"] == kind and (kind == "dense" or (
        math.isclose(r["ratio"], ratio) and not conversion_changes(r)
        and (kind == "unhealed" or (not r.get("heal_options") and r.get("budget_tokens") == HEAL_BUDGET))))]
    return max(found, key=lambda r: r.get("limit", 0)) if found else None


def bench_row_label(r: dict) -> str:
    if r["kind"] == "dense":
        return "dense"
    text = f"{pct(r['ratio'])} {r['kind']}"
    if r["kind"] == "healed":
        options = ", ".join(f"{k} {v}" for k, v in (r.get("heal_options") or {}).items())
        text += f" ({r['budget_tokens']:,} tokens" + (f", {options}" if options else "") + ")"
    return ", ".join([text] + conversion_changes(r))


def model_order(r: dict) -> tuple:
    return r["kind"] != "dense", r["ratio"], r["kind"] == "healed", r.get("budget_tokens") or 0, r["model"]


def chat_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    first = rows[0]
    limit = first["max_new_tokens"]
    out = [(f"Chat behaviour (`quick_heal_chat.jsonl`; the answers themselves in `quick_heal_chat_answers.json`): each "
           f"model answers the {first['prompts']} prompts of `benchmarks/{first['prompts_file']}` (short questions "
           "and instructions written for this benchmark, none from an evaluation set), each as one user turn through "
           f"its chat template, greedily, at most {limit} new tokens, {first['dtype']}. *answered*: share of non-empty "
           "answers; *first sentence = dense*: share whose first sentence (of an answer cut at the limit: of what was "
           "written) is exactly the dense model's (100% for the dense row by construction); *dense NLL*: the dense model's mean NLL per token of the answers "
           "(non-empty ones only; for the dense row, of its own answers); *cut*: answers the token limit stopped."),
           ""]
    body = []
    ordered = sorted(rows, key=model_order)
    for r, label in zip(ordered, distinct_labels(ordered)):
        nll = "-" if r["teacher_nll"] is None else f"{r['teacher_nll']:.3f}"
        body.append([label, pct(r["non_empty"], 1), pct(r["first_sentence_match"], 1), nll,
                     f"{r['answer_tokens']:,}", pct(r["cut_at_limit"]), f"{r['generation_wall_time_s']:.0f}",
                     r["threads"]])
    out.append(table(["model", "answered", "first sentence = dense", "dense NLL", "answer tokens",
                      f"cut at {limit} tokens", "generation (s)", "threads"], body))
    return out


def zeroshot_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    latest = {}
    for r in rows:  # one row per model: the one with the most items per set
        if r["model"] not in latest or r["limit"] >= latest[r["model"]]["limit"]:
            latest[r["model"]] = r
    rows = sorted(latest.values(), key=model_order)
    tasks = list(rows[0]["tasks"])
    limits = sorted({r["limit"] for r in rows})
    out = [(f"Zero-shot (`quick_heal_zeroshot.jsonl`): lm-eval 0-shot with its own prompts and metrics on the first "
           f"{' / '.join(str(n) for n in limits)} items of each of the six local sets, {rows[0]['dtype']}, batch "
           f"{rows[0]['batch_size']}. Cells are acc / acc_norm; the means are unweighted over the six sets (acc) and "
           f"the five with acc_norm. At {limits[0]} items one set's accuracy has a standard error of up to "
           f"{std_error(0.5, limits[0]):.3f}, the six-set mean of up to {std_error(0.5, limits[0]) / math.sqrt(6):.3f}."),
           ""]
    body = []
    for r in rows:
        cells = [f"{t['acc']:.3f}" + (f" / {t['acc_norm']:.3f}" if "acc_norm" in t else "") for t in r["tasks"].values()]
        norm = "-" if r["mean_acc_norm"] is None else f"{r['mean_acc_norm']:.3f}"
        body.append([bench_row_label(r), *cells, f"**{r['mean_acc']:.3f}**", norm, r["limit"],
                     f"{r['wall_time_s'] / 60:.0f}", r["threads"]])
    out.append(table(["model", *(t.removeprefix("hfc_") for t in tasks), "mean acc", "mean acc_norm",
                      "items per set", "wall (min)", "threads"], body))
    return out


def gap_closed(before: float, after: float, dense: float) -> float:
    """Share of the student's log-perplexity gap to the dense model that healing removed: `log(before / after) /
    log(before / dense)` (1: healed to the dense model's perplexity; 0: no change)."""
    return math.log(before / after) / math.log(before / dense)


def same_run_but_budget(r: dict, ref: dict) -> bool:
    """`r` heals the student of `ref` with the same options (`heal_differences`) and precision, on another budget."""
    return (math.isclose(r["ratio"], ref["ratio"]) and r["budget_tokens"] != ref["budget_tokens"]
            and not heal_differences(r, ref) and r.get("heal_dtype") == ref.get("heal_dtype")
            and math.isclose(r["wikitext2_before"], ref["wikitext2_before"]))


def heal_gap_lines(rows: list[dict], dense: dict | None) -> list[str]:
    """How much of the log-perplexity gap to the dense model healing removes (`gap_closed`): the README's row per
    ratio, what each WikiText-2 target asks of it, and the same healing on other budgets."""
    summary = summary_heal_rows(rows)
    if not (dense and summary):
        return []
    def closed(r: dict, name: str) -> str:
        return pct(gap_closed(r[f"{name}_before"], r[f"{name}_after"], dense[name]))
    lines = ["At " + ", ".join(f"{pct(r['ratio'])} ({r['row']})" for r in summary) + ": "
             + " / ".join(closed(r, "wikitext2") for r in summary) + " of the WikiText-2 gap, "
             + " / ".join(closed(r, "c4") for r in summary) + " of the C4-validation gap"]
    for r in summary:
        goal = WIKITEXT_TARGETS.get(r["ratio"])
        if goal is not None and r["budget_tokens"] == HEAL_BUDGET:
            lines.append(f"WikiText-2 at most {goal:.0f} at {pct(r['ratio'])} asks for "
                         f"{pct(gap_closed(r['wikitext2_before'], goal, dense['wikitext2']))} of its gap")
    for ref in summary:
        for r in sorted((r for r in rows if same_run_but_budget(r, ref)), key=lambda r: r["budget_tokens"]):
            lines.append(f"{r['row']} ({r['budget_tokens']:,} tokens, otherwise as {ref['row']}): WikiText-2 "
                         f"{r['wikitext2_after']:.2f}, {closed(r, 'wikitext2')} of the gap; C4 validation "
                         f"{r['c4_after']:.2f}, {closed(r, 'c4')}")
    return lines


def heal_targets(rows: list[dict], dense: dict | None, chat_rows: list[dict], zeroshot_rows: list[dict]) -> list[str]:
    """One verdict per target and run, each naming its run: the row of `quick_heal.jsonl` (its name says the ratio,
    the budget and the data), or the model of a chat or zero-shot row (`healed-<row>`)."""
    checks = []
    for r in rows:
        if r["ratio"] in WIKITEXT_TARGETS and is_main_heal(r):
            goal = WIKITEXT_TARGETS[r["ratio"]]
            checks.append(f"{r['row']}: WikiText-2 {r['wikitext2_after']:.2f} against at most {goal:.0f} "
                          f"({'met' if r['wikitext2_after'] <= goal else 'missed'})")
            if r["ratio"] == 0.2 and dense:
                ok = r["c4_after"] <= 2 * dense["c4"]
                checks.append(f"{r['row']}: C4 validation {r['c4_after']:.2f} against at most twice the dense "
                              f"model's ({2 * dense['c4']:.2f}; {'met' if ok else 'missed'})")
    main = [r for r in rows if is_main_heal(r)]
    if main:
        ahead = all(r["c4_after"] < r["c4_before"] for r in main)
        each = ", ".join(f"{r['row']} {r['c4_before']:.2f} -> {r['c4_after']:.2f}"
                         for r in sorted(main, key=lambda r: r["ratio"]))
        checks.append(f"healed below unhealed on C4 validation at every ratio ({each}; "
                      f"{'met' if ahead else 'missed'})")
    for r in rows:
        calls = r.get("conversion_call_wall_time_s"), r.get("heal_call_wall_time_s")
        if (math.isclose(r["ratio"], PIPELINE_RATIO) and is_main_heal(r)
                and math.isclose(chat_share(r), PIPELINE_CHAT_SHARE) and all(calls)):
            minutes = sum(calls) / 60
            checks.append(f"{r['row']}: conversion + healing ({pct(r['ratio'])}{mix_tag(r)}, "
                          f"{r['budget_tokens']:,} tokens) {minutes:.1f} min (conversion {calls[0] / 60:.1f} + "
                          f"healing {calls[1] / 60:.1f}, loading, chat text and saving included, as two calls) "
                          f"against under {PIPELINE_MINUTES:.0f} ({'met' if minutes < PIPELINE_MINUTES else 'missed'})")
    for healed in healed_rows(chat_rows, CHAT_TARGET_RATIO):
        ok = healed["non_empty"] >= CHAT_NON_EMPTY_TARGET
        checks.append(f"{healed['model']}: {pct(healed['non_empty'], 1)} of the {healed['prompts']} chat prompts "
                      f"answered against at least {pct(CHAT_NON_EMPTY_TARGET)} ({'met' if ok else 'missed'})")
    unhealed = bench_row(zeroshot_rows, ZEROSHOT_TARGET_RATIO, "unhealed")
    for healed in healed_rows(zeroshot_rows, ZEROSHOT_TARGET_RATIO) if unhealed else []:
        if healed["limit"] != unhealed["limit"]:
            continue
        ok = healed["mean_acc"] > unhealed["mean_acc"]
        checks.append(f"{healed['model']}: mean zero-shot acc {healed['mean_acc']:.3f} against "
                      f"{unhealed['mean_acc']:.3f} for {unhealed['model']}, to be above it ({healed['limit']} items "
                      f"per set; {'met' if ok else 'missed'})")
    return checks


def ablation_base(rows: list[dict]) -> dict | None:
    return next((r for r in rows if r["row"] == ABLATION_BASE), None)


def heal_differences(r: dict, ref: dict) -> list[str]:
    """What run `r` changes from run `ref`: the healing options that differ, then the conversion underneath."""
    options = {**LATER_HEAL_OPTIONS, **r.get("heal_options", {})}
    ref_options = {**LATER_HEAL_OPTIONS, **ref.get("heal_options", {})}
    changed = [f"{key} {options[key]:g}" if isinstance(options[key], float) else f"{key} {options[key]}"
               for key in options if key != "tokens" and options[key] != ref_options.get(key)]
    if r.get("sequential", True) != ref.get("sequential", True):
        changed.append("no sequential calibration" if ref.get("sequential", True) else "sequential calibration")
    if r.get("calib_chat_fraction", 0.0) != ref.get("calib_chat_fraction", 0.0):
        changed.append(f"calibration {r.get('calib_chat_fraction', 0.0):.0%} chat text")
    if r.get("group_size", GROUP_SIZE) != ref.get("group_size", GROUP_SIZE):
        changed.append(f"group size {r.get('group_size', GROUP_SIZE)}")
    return changed


def heal_ablations(rows: list[dict]) -> list[str]:
    """Each run at the ablation base's ratio and budget against the base (`ABLATION_BASE`), or against the run it
    changes one thing of where that run is itself a change from the base (`--lr 5e-5` at two sequences a step
    against two sequences a step): what it changes and its perplexities after healing, relative. Only runs in the
    base's precision whose student is the base's (the same perplexity before healing) or another conversion of it
    (without sequential calibration, with chat text): rows of an earlier conversion or another machine do not
    compare."""
    base = ablation_base(rows)
    if base is None:
        return []
    comparable = []
    for r in rows:
        if r is base or not math.isclose(r["ratio"], base["ratio"]) or r["budget_tokens"] != base["budget_tokens"]:
            continue
        same_student = math.isclose(r["wikitext2_before"], base["wikitext2_before"])
        other_conversion = bool(conversion_changes(r))
        if r.get("heal_dtype") == base.get("heal_dtype") and (same_student or other_conversion):
            comparable.append(r)
    from_base = {id(c): len(heal_differences(c, base)) for c in comparable}
    lines = []
    for r in comparable:
        # The closest run on the way from the base: fewer changes from the base than this one, and fewer from it.
        ref = min([base] + [c for c in comparable if c is not r and from_base[id(c)] < from_base[id(r)]],
                  key=lambda c: len(heal_differences(r, c)))
        against = "" if ref is base else f" against {ref['row']}"
        lines.append(f"{r['row']} ({', '.join(heal_differences(r, ref)) or 'same options'}{against}): WikiText-2 "
                     f"{r['wikitext2_after']:.2f} ({change(r['wikitext2_after'], ref['wikitext2_after'], 1)}), C4 "
                     f"validation {r['c4_after']:.2f} ({change(r['c4_after'], ref['c4_after'], 1)})")
    return lines


def md_cell(text: str) -> str:
    """An answer as one markdown table cell: HTML and pipes escaped, line breaks as <br>."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return "<br>".join(line.strip() for line in text.strip().splitlines())


def chat_exchange(answers: dict | None, chat_rows: list[dict], where: str = "") -> str:
    """One prompt (`EXCHANGE_PROMPT`, fixed) with the measured answers of the dense model, the unhealed 20% student
    and the 20% model healed as the main rows are, side by side; "" until all three were measured. `where` is the
    path of the results folder from the file the text goes into."""
    if not answers:
        return ""
    picked = [bench_row(chat_rows, CHAT_TARGET_RATIO, kind) for kind in ("dense", "unhealed", "healed")]
    if not all(picked) or not all(r["model"] in answers["models"] for r in picked):
        return ""
    # Models healed as the main rows are, with the teacher's chat text, at the same ratio, beside the main healed row.
    picked += sorted((r for r in healed_rows(chat_rows, CHAT_TARGET_RATIO)
                      if (r.get("heal_options") or {}).get("chat_fraction") and r["model"] in answers["models"]),
                     key=model_order)
    limit = answers["max_new_tokens"]
    cells = []
    for r in picked:
        got = answers["models"][r["model"]]
        text = md_cell(got["answers"][EXCHANGE_PROMPT]) or "*(no answer: the model ends its turn at once)*"
        cells.append(text + ("" if got["finished"][EXCHANGE_PROMPT] else f" *[cut at {limit} tokens]*"))
    prompt = answers["prompt_texts"][EXCHANGE_PROMPT]
    return "\n".join([
        (f"Prompt {EXCHANGE_PROMPT + 1} of `benchmarks/{answers['prompts_file']}` (always this one, whatever the "
        f"answers), asked as one user turn through the chat template; greedy answers of at most {limit} new tokens, "
        f"as measured (`{where}quick_heal_chat_answers.json`):"),
        "",
        "> " + md_cell(prompt),
        "",
        table(distinct_labels(picked), [cells]),
    ])


def distinct_labels(rows: list[dict]) -> list[str]:
    """`bench_row_label` of each row, with the model's name added where two rows would read the same."""
    labels = [bench_row_label(r) for r in rows]
    return [f"{label} [{r['model']}]" if labels.count(label) > 1 else label for label, r in zip(labels, rows)]


def heal_positions(store: dict | None) -> list[str]:
    """Per compressed model of `quick_heal_positions.json`: its perplexity over the first and the last position bucket of
    the 2048-token windows, as multiples of the dense model's, on both texts."""
    if not store or "dense" not in store.get("models", {}):
        return []
    models, bucket = store["models"], store["bucket"]
    dense = models["dense"]
    lines = []
    for name, row in models.items():
        if name == "dense":
            continue
        ratios = {text: (row[text][0] / dense[text][0], row[text][-1] / dense[text][-1]) for text in ("wikitext2", "c4")}
        last = f"{bucket * (len(row['wikitext2']) - 1)}-{bucket * len(row['wikitext2']) - 1}"
        lines.append(f"{name}: WikiText-2 {ratios['wikitext2'][0]:.2f}x dense over positions 0-{bucket - 1}, "
                     f"{ratios['wikitext2'][1]:.2f}x over {last}; C4 validation {ratios['c4'][0]:.2f}x and "
                     f"{ratios['c4'][1]:.2f}x")
    return lines


def calibration_chat_lines(students: dict | None, chat_rows: list[dict]) -> list[str]:
    """Each student calibrated partly on the source's chat text against the student of the same ratio and
    calibration otherwise (`quick_heal_students.json`), unhealed: perplexities, and the share of chat prompts
    answered where the chat stage measured both."""
    students = students or {}
    answered = {r["model"]: r["non_empty"] for r in chat_rows if "non_empty" in r}
    lines = []
    for name, s in students.items():
        if not s.get("calib_chat_fraction"):
            continue
        base_name = next((n for n, b in students.items() if not b.get("calib_chat_fraction")
                          and math.isclose(b["ratio"], s["ratio"]) and b["sequential"] == s["sequential"]
                          and b.get("group_size", GROUP_SIZE) == s.get("group_size", GROUP_SIZE)), None)
        if base_name is None:
            continue
        base = students[base_name]
        line = (f"{name} ({pct(s['calib_chat_fraction'])} of the calibration samples chat text): WikiText-2 "
                f"{s['wikitext2']:.2f} against {base['wikitext2']:.2f} for {base_name} "
                f"({change(s['wikitext2'], base['wikitext2'], 1)}), C4 validation {s['c4']:.2f} against "
                f"{base['c4']:.2f} ({change(s['c4'], base['c4'], 1)})")
        if name in answered and base_name in answered:
            line += f"; chat prompts answered {pct(answered[name], 1)} against {pct(answered[base_name], 1)}"
        lines.append(line)
    return lines


def heal_section(rows: list[dict], dense: dict | None, chat_rows: list[dict] | None = None,
                 zeroshot_rows: list[dict] | None = None, answers: dict | None = None,
                 positions: dict | None = None, students: dict | None = None) -> str:
    chat_rows, zeroshot_rows = chat_rows or [], zeroshot_rows or []
    if not (rows or chat_rows or zeroshot_rows):
        return ""
    out = ["## LLM healing, protocol \"quick-heal\" (CPU)", "",
           ("`benchmarks/bench_quick_heal.py`, rows in `quick_heal.jsonl`. The student is the default conversion of "
            "protocol \"quick\" at each ratio; healing distils it from the dense model (KL on the next-token "
            "distribution unless the row says otherwise) on the C4 calibration documents (a train shard: 512-token "
            "chunks, seed-2023 order, cycled); evaluation is WikiText-2 quick and C4 validation (first 20 windows of "
            "2048 each), never trained on.")]
    if dense:
        out += ["", f"Dense model: WikiText-2 {dense['wikitext2']:.2f}, C4 validation {dense['c4']:.2f}."]
    body = []
    for r in rows:
        options = r.get("heal_options", {})
        setting = ", ".join(filter(None, [options.get("trainable", "factors"), options.get("loss", "kl"),
                                          f"{pct(chat_share(r))} chat text" if chat_share(r) else None,
                                          f"{pct(options['free_text_fraction'])} free text"
                                          if options.get("free_text_fraction") else None,
                                          f"batch {options['batch_size']}" if options.get("batch_size", 4) != 4
                                          else None,
                                          f"temperature {options['temperature']:g}"
                                          if options.get("temperature", 1.0) != 1.0 else None,
                                          f"layer term {options['hidden_weight']:g}"
                                          if options.get("hidden_weight", 0.0) else None,
                                          "balanced factors" if options.get("balance_factors") else None,
                                          f"block-wise first ({options['block_tokens']:,} tokens x "
                                          f"{options.get('block_epochs', 1)}, lr {options.get('block_lr', 1e-4):g})"
                                          if options.get("block_tokens") else None,
                                          *conversion_changes(r)]))
        body.append([r["row"], pct(r["ratio"]), f"{r['budget_tokens']:,}", setting, f"{options['lr']:g}" if "lr" in options else "-",
                     f"{r['heal_trainable_params']:,}",
                     f"{r['wikitext2_before']:.2f} -> **{r['wikitext2_after']:.2f}**",
                     f"{r['c4_before']:.2f} -> **{r['c4_after']:.2f}**",
                     f"{r['c4_after'] / dense['c4']:.2f}x" if dense else "-",
                     f"{r['heal_wall_time_s'] / 60:.1f}", f"{r['heal_tokens_per_s']:.0f}", r.get("heal_dtype", "-"),
                     f"{r['heal_peak_rss_mb']:,.0f}"])
    if body:
        out += ["", table(["row", "ratio", "budget (tokens)", "trains, loss, data", "peak lr", "trainable params",
                           "WikiText-2 ppl", "C4-val ppl", "C4 healed / dense", "healing (min)", "tokens/s", "precision",
                           "peak RSS (MB)"], body),
                "", ("*healing (min)* and *tokens/s* count the training steps (the teacher writing its chat text, "
                     "loading and saving excluded); *precision* is the autocast of the training (bfloat16 where the "
                     "CPU has it natively), float32 otherwise: it follows the machine, and so does the speed.")]
    for part in (chat_table(chat_rows), zeroshot_table(zeroshot_rows)):
        if part:
            out += [""] + part
    checks = heal_targets(rows, dense, chat_rows, zeroshot_rows)
    if checks:
        out += ["", "Targets, one line per run:", ""] + [f"- {check}" for check in checks]
    gaps = heal_gap_lines(rows, dense)
    if gaps:
        out += ["", ("Share of the log-perplexity gap to the dense model that healing removes, "
                     "`log(before / after) / log(before / dense)` (100%: the dense model's perplexity):"), ""] + [
            f"- {line}" for line in gaps]
    ablations = heal_ablations(rows)
    if ablations:
        base = ablation_base(rows)
        out += ["", (f"Ablations at {pct(base['ratio'])} and {base['budget_tokens']:,} tokens, each against "
                     f"{ABLATION_BASE} (WikiText-2 {base['wikitext2_after']:.2f}, C4 validation "
                     f"{base['c4_after']:.2f}) unless the line names another run:"), ""] + [
            f"- {line}" for line in ablations]
    calibration_chat = calibration_chat_lines(students, chat_rows)
    if calibration_chat:
        out += ["", "Calibration on the source's own chat text, before healing (`quick_heal_students.json`):", ""] + [
            f"- {line}" for line in calibration_chat]
    by_position = heal_positions(positions)
    if by_position:
        out += ["", (f"Perplexity by position in the 2048-token windows ([quick_heal_positions.md]"
                     f"(quick_heal_positions.md); healing trains on {positions['bucket']}-token chunks), against the "
                     "dense model's at the same positions:"), ""] + [f"- {line}" for line in by_position]
    exchange = chat_exchange(answers, chat_rows)
    if exchange:
        out += ["", "One chat exchange (dense, unhealed and healed at 20%):", "", exchange]
    measured: dict[str, list[str]] = {}  # note -> what was measured under it
    for what, group in (("healing", rows), ("chat", chat_rows), ("zero-shot", zeroshot_rows)):
        for r in group:
            if r.get("note"):
                measured.setdefault(r["note"].strip().rstrip("."), []).append(f"{what} {r.get('row') or r['model']}")
    if measured:
        out += ["", "Conditions: " + "; ".join(f"{', '.join(names)}: {note}" for note, names in measured.items()) + "."]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------- summary
def summary_heal_rows(rows: list[dict]) -> list[dict]:
    """One healing row per ratio for the README, by ratio: of the rows healed as the main rows are, the last
    measured with the most chat text (the library's default data for this chat model, where measured)."""
    picked: dict[float, dict] = {}
    for r in rows:
        if is_main_heal(r) and (r["ratio"] not in picked or chat_share(r) >= chat_share(picked[r["ratio"]])):
            picked[r["ratio"]] = r
    return [picked[ratio] for ratio in sorted(picked)]


def summary_table(llm: LLMRows, pruning: dict, exits: dict, heal_rows: list[dict] | None = None,
                  heal_dense: dict | None = None, cnn_exits: dict | None = None, cnn_prune: dict | None = None) -> str:
    """The README's table; full-scale "cifar-cpu" pruning and early-exit rows replace the reduced-scale ones once
    measured."""
    rows = []
    for r in summary_heal_rows(heal_rows or []):
        dense = f"{heal_dense['wikitext2']:.2f} -> " if heal_dense else ""
        mix = f", {chat_share(r):.0%} of it the model's own chat text" if chat_share(r) else ""
        if r["heal_options"].get("loss", "kl") != "kl":
            mix += f", loss {r['heal_options']['loss']}"
        rows.append([f"Basis Sharing {r['ratio']:.0%} + healing ({r['budget_tokens']:,} tokens of distillation{mix})",
                     "SmolLM2-135M-Instruct, CPU", f"WikiText-2 ppl {dense}{r['wikitext2_after']:.2f}",
                     f"unhealed: {r['wikitext2_before']:.2f}", "protocol \"quick-heal\""])
    if llm.rows and llm.dense:
        for r in (0.2,):  # the ratio the healing rows also show; every ratio is in the results README
            row = llm.get(DEFAULT_LLM, r)
            if not row:
                continue
            base = llm.ppl("svd-llm", r)
            rows.append([f"Basis Sharing, {r:.0%} of the projection parameters removed (defaults)", "SmolLM2-135M-Instruct, CPU",
                         f"WikiText-2 ppl {llm.dense['perplexity']:.2f} -> {row['perplexity']:.2f}",
                         f"SVD-LLM at the same ratio: {base:.2f}" if base else "-", "protocol \"quick\""])
    full_scale_pruning = cnn_cpu_prune_rows(cnn_prune)
    rows += full_scale_pruning
    l1 = {k: v for k, v in pruning.items() if "_l1_" in k and "double" not in k and not full_scale_pruning}
    for name, d in l1.items():
        for net in d["networks"]:
            base = net["rows"][0]
            ca = next(r for r in net["rows"] if r["model"].endswith("class-aware"))
            l1n = next(r for r in net["rows"] if r["model"].endswith("L1-norm"))
            rows.append(["Class-aware pruning (L1 regulariser)", f"{net['arch']} at 1/{net['width_divisor']} width, CIFAR-10, CPU",
                         (f"{pct(ca['macs_reduction'])} fewer MACs, acc {pct(base['test_accuracy'], 1)} -> "
                          f"{pct(ca['test_accuracy'], 1)}"),
                         f"L1-norm pruning, same MACs and epochs: {pct(l1n['macs_reduction'])} fewer MACs, acc {pct(l1n['test_accuracy'], 1)}",
                         "reduced scale"])
    full_scale = cnn_cpu_exit_rows(cnn_exits)
    rows += full_scale
    for name, d in sorted(exits.items(), key=lambda kv: "hf-" in kv[0]) if not full_scale else []:
        for a in d["archs"]:
            ce = {t["tolerance"]: t for t in a["rules"].get("class_exclusion", {}).get("tolerances", [])}
            cf = {t["tolerance"]: t for t in a["rules"].get("confidence", {}).get("tolerances", [])}
            if 0.005 not in ce or (a["arch"] == "resnet20" and "10k" not in name):
                continue
            t = ce[0.005]
            c = cf.get(0.005)
            rows.append(["Early exit, class exclusion, tolerance 0.005", f"{a['arch']}, CIFAR-10, CPU",
                         (f"{pct(t['macs_reduction'], 1)} fewer MACs, acc {pct(t['test_accuracy_full'], 1)} -> "
                          f"{pct(t['test_accuracy'], 1)}"),
                         f"max-softmax exits: {pct(c['macs_reduction'], 1)} fewer MACs, acc {pct(c['test_accuracy'], 1)}"
                         if c else "-", "reduced scale"])
    return table(["method", "model, data", "result", "baseline", "scale"], rows)


# ----------------------------------------------------------------------------------------------------- main
def build() -> tuple[str, str]:
    llm = LLMRows(load_jsonl("llm_quality_quick.jsonl"))
    logs = {p.name: load_log(p.name) for p in sorted(RESULTS.glob("*.log"))}
    lm = {p.name: json.loads(p.read_text()) for p in sorted(RESULTS.glob("lm_eval_*.json"))}
    pruning = {p.name: json.loads(p.read_text()) for p in sorted(RESULTS.glob("pruning_*.json"))}
    exits = {p.name: json.loads(p.read_text()) for p in sorted(RESULTS.glob("early_exit_*.json"))}
    cnn = {p.name: json.loads(p.read_text()) for p in sorted(RESULTS.glob("cnn_cpu_*.json"))}
    speed = sorted(p.name for p in RESULTS.glob("llm_speed*"))
    heal_rows = load_jsonl("quick_heal.jsonl")
    heal_dense = load_json("quick_heal_dense.json")
    chat_rows, zeroshot_rows = load_jsonl("quick_heal_chat.jsonl"), load_jsonl("quick_heal_zeroshot.jsonl")
    chat_answers = load_json("quick_heal_chat_answers.json")
    # the two early-exit runs of the first round first, the less loaded one last
    exits = dict(sorted(exits.items(), key=lambda kv: ("10k" in kv[0], "hf-" in kv[0])))

    parts = [
        "# Measured results",
        "",
        "<!-- Generated by benchmarks/report.py from the files in this folder; edit the script, not this file. -->",
        "",
        ("Every table and figure below is formatted from the result files in this folder (`*.json`, `*.jsonl`; the "
         "`*.log` files are the printed output of single CLI runs). Protocols are those of the project's benchmark "
         "protocol document: LLM quality \"quick\", lm-eval zero-shot, CNN and \"cifar-cpu\"."),
        "",
        ("**Machines.** Every number here comes from 2-core CPU machines; no GPU protocol has been run. Where other "
         "work shared the two cores during a measurement, the row or the run says so; its times are then not speed "
         "figures. The CNN runs outside protocol \"cifar-cpu\" are **reduced scale** (narrow networks, a few "
         "thousand images, a few epochs): they "
         "check the pipeline end to end and are not comparable with the papers' numbers."),
        "",
        "Contents: " + ", ".join(f"[{t}](#{a})" for t, a in [
            ("make main", "make-main-cpu"),
            ("LLM quality", "llm-quality-smollm2-135m-instruct-protocol-quick-cpu"),
            ("LLM healing", "llm-healing-protocol-quick-heal-cpu"),
            ("lm-eval", "lm-evaluation-harness-cpu"),
            ("LLM speed", "llm-speed-gpu"),
            ("class-aware pruning", "class-aware-pruning-reduced-scale-cpu"),
            ("early exit", "early-exit-with-class-exclusion-reduced-scale-cpu"),
            ("CNN cifar-cpu", "cnn-protocol-cifar-cpu-cpu")]) + ".",
        "",
        logs_section(logs),
        "",
        llm_section(llm, logs),
        "",
        heal_section(heal_rows, heal_dense, chat_rows, zeroshot_rows, chat_answers,
                     load_json("quick_heal_positions.json"), load_json("quick_heal_students.json")),
        "",
        save_dtype_section(load_json("save_dtype.json")),
        "",
        lm_eval_section(lm.get("lm_eval_quick.json"), lm.get("lm_eval_reduced.json"),
                        lm.get("lm_eval_zeroshot_limit20.json"), llm),
        "",
        "## LLM speed (GPU)",
        "",
        ("Stored: " + ", ".join(f"`{n}`" for n in speed) + "." if speed else
         "No result of `benchmarks/bench_llm_speed.py` is stored: the \"LLM speed\" protocol (LLaMA-7B shape, bf16, "
         "prefill and decode with the KV cache; dense, factorised, fused and fused + break-even models in one run) "
         "needs a GPU and has not been run. No speed figure is claimed."),
        "",
        pruning_section(pruning),
        "",
        early_exit_section(exits),
        "",
        cnn_cpu_section(cnn),
    ]
    text = "\n".join(p for p in parts if p is not None)
    text = re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"
    return text, summary_table(llm, pruning, exits, heal_rows, heal_dense, cnn.get("cnn_cpu_exits.json"),
                               cnn.get("cnn_cpu_prune.json"))


def with_block(readme: str, start: str, end: str, text: str) -> str:
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{text}\n{end}{tail}"


def with_summary(readme: str, summary: str) -> str:
    if SUMMARY_START not in readme or SUMMARY_END not in readme:
        raise SystemExit(f"README.md lacks the {SUMMARY_START} / {SUMMARY_END} markers")
    return with_block(readme, SUMMARY_START, SUMMARY_END, summary)


def exchange_files() -> tuple[str, str]:
    """The chat exchange as its own file (`EXCHANGE_FILE`) and as README.md's block; ("", "") until measured."""
    rows, answers = load_jsonl("quick_heal_chat.jsonl"), load_json("quick_heal_chat_answers.json")
    own, readme = chat_exchange(answers, rows), chat_exchange(answers, rows, "benchmarks/results/")
    if not own:
        return "", ""
    head = ["# One chat exchange: dense, unhealed and healed SmolLM2-135M-Instruct at 20%", "",
            "<!-- Generated by benchmarks/report.py from quick_heal_chat*.json*; edit the script, not this file. -->",
            ""]
    return "\n".join(head) + own + "\n", readme


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is out of date")
    args = parser.parse_args()
    results, summary = build()
    readme = with_summary(MAIN_README.read_text(), summary)
    exchange, exchange_block = exchange_files()
    if exchange_block and EXCHANGE_START in readme and EXCHANGE_END in readme:
        readme = with_block(readme, EXCHANGE_START, EXCHANGE_END, exchange_block)
    outputs = [(RESULTS_README, results), (MAIN_README, readme)] + ([(EXCHANGE_FILE, exchange)] if exchange else [])
    stale = [(p, text) for p, text in outputs if not p.exists() or p.read_text() != text]
    if args.check:
        for p, _ in stale:
            print(f"out of date: {p.relative_to(ROOT)}")
        sys.exit(1 if stale else 0)
    for p, text in stale:
        p.write_text(text)
        print(f"wrote {p.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
