"""lm-eval WikiText-2 word perplexity (offline task `hfc_wikitext2`) next to `hf-compress ppl`, with wall times.

For each model (the dense SmolLM2-135M-Instruct GGUF as `smollm2`, or a checkpoint folder such as the output of
`hf-compress convert`), this runs

1. lm-eval `hfc_wikitext2` (stock `wikitext` scoring over the articles rebuilt from the local line-level test file):
   word perplexity = exp(total NLL / words), byte perplexity, and the token perplexity implied by the same NLL
   (exp(total NLL / tokens), tokens counted with the model's tokenizer on the detokenized articles);
2. `hf-compress ppl` (`hf_compress.evaluation.perplexity.perplexity`) on the same articles: joined with "\\n\\n", raw spacing,
   non-overlapping windows of 2048 tokens (the last partial one dropped), exp of the mean window loss;
3. optionally the six zero-shot tasks (`hfc_zeroshot`, `--zeroshot-limit` items per task; 200 = protocol "quick").

Results: benchmarks/results/lm_eval_<tag>.json (one record per model, appended as they finish; models already there
are skipped, so a run resumes) and a markdown table lm_eval_<tag>.md. With --update-card, checkpoint folders also get the numbers in their model cards.

    python benchmarks/bench_lm_eval.py --model dense=smollm2 --model bs-20=outputs/smollm2-bs-0.2 --wikitext-docs 8
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch

from hf_compress.evaluation.lm_eval import card_entries, run_lm_eval
from hf_compress.evaluation.perplexity import perplexity
from hf_compress.evaluation.tasks.utils import (
    WIKITEXT2_TEST,
    data_dir,
    split_articles,
    wikitext_detokenizer,
)
from hf_compress.sources import load_causal_lm, resolve_source

RESULTS = Path(__file__).resolve().parent / "results"
ZEROSHOT_NOTE = "0-shot with its own prompts and metrics, on the first items of each local set"


def wikitext_pages(docs: int | None) -> list[str]:
    """The first `docs` WikiText-2 test articles, as lm-eval's `hfc_wikitext2` task cuts them."""
    import datasets

    lines = datasets.load_dataset("parquet", data_files={"test": str(data_dir() / WIKITEXT2_TEST)}, split="test")["text"]
    return split_articles(lines)[:docs]


def wikitext_counts(tokenizer, docs: int | None) -> dict:
    """Words (lm-eval's count, on the original article), tokens of the detokenized articles lm-eval scores, and
    tokens of the raw articles joined with "\n\n" that `hf-compress ppl` scores."""
    pages = wikitext_pages(docs)
    words = sum(len(re.split(r"\s+", p)) for p in pages)
    tokens = sum(len(tokenizer(wikitext_detokenizer({"page": p}), add_special_tokens=False).input_ids) for p in pages)
    raw_tokens = len(tokenizer("\n\n".join(pages), add_special_tokens=False).input_ids)
    return {"documents": len(pages), "words": words, "tokens": tokens, "raw_tokens": raw_tokens}


def bench_model(name: str, spec: str, args) -> dict:
    path, gguf_file = resolve_source(spec)
    record: dict = {"model": name, "spec": spec, "gguf_file": gguf_file}
    config = json.loads((Path(path) / "config.json").read_text()) if (Path(path) / "config.json").is_file() else {}
    compression = config.get("compression") or {}
    record["target_ratio"] = compression.get("target_ratio", 0.0 if gguf_file else None)
    record["achieved_ratio"] = compression.get("achieved_ratio", 0.0 if gguf_file else None)

    entries: list[dict] = []
    if not args.no_wikitext:
        results = run_lm_eval(path, ["hfc_wikitext2"], limit=args.wikitext_docs, gguf_file=gguf_file,
                              batch_size=1, max_length=args.max_length, device=args.device)
        wiki = results["results"]["hfc_wikitext2"]
        record["lm_eval_wall_s"] = results["hf_compress"]["wall_time_s"]
        record["word_perplexity"] = wiki["word_perplexity,none"]
        record["byte_perplexity"] = wiki["byte_perplexity,none"]
        entries += card_entries(results)

        model, tokenizer = load_causal_lm(spec)
        model.to(args.device)
        counts = wikitext_counts(tokenizer, args.wikitext_docs)
        record.update(counts)
        nll = math.log(record["word_perplexity"]) * counts["words"]
        record["lm_eval_token_perplexity"] = math.exp(nll / counts["tokens"])

        # The same articles, scored the hf-compress way: joined with "\n\n", raw spacing, 2048-token windows.
        start = time.perf_counter()
        record["ppl"] = perplexity(model, tokenizer, wikitext_pages(args.wikitext_docs), seq_len=2048, progress=False)
        record["ppl_wall_s"] = time.perf_counter() - start
        record["ppl_windows"] = counts["raw_tokens"] // 2048
        del model

    if args.zeroshot_limit:
        zs = run_lm_eval(path, ["hfc_zeroshot"], limit=args.zeroshot_limit, gguf_file=gguf_file,
                         batch_size=args.zeroshot_batch_size, device=args.device)
        record["zeroshot_wall_s"] = zs["hf_compress"]["wall_time_s"]
        record["zeroshot"] = {task: {k.split(",")[0]: v for k, v in m.items() if k.startswith(("acc,", "acc_norm,"))}
                              for task, m in zs["results"].items()}
        entries += card_entries(zs)

    if args.update_card and not gguf_file:
        from hf_compress.cards import record_eval_results

        if "ppl" in record:
            entries.append({
                "task_type": "text-generation", "dataset_type": "wikitext", "dataset_name": "WikiText-2 (raw, test)",
                "dataset_config": "wikitext-2-raw-v1", "dataset_split": "test", "metric_type": "perplexity",
                "metric_name": f"perplexity (hf-compress ppl, 2048-token windows, first {record['documents']} test articles)",
                "metric_value": record["ppl"], "source": "hf-compress ppl",
            })
        record_eval_results(path, entries)
        record["card_updated"] = True
    return record


def markdown(records: list[dict], args) -> str:
    lines = [] if not any("word_perplexity" in r for r in records) else [
        f"lm-eval `hfc_wikitext2` ({args.wikitext_docs or 'all 62'} articles, max_length {args.max_length}) vs "
        "`hf-compress ppl` on the same articles (joined with \"\\n\\n\", windows of 2048 tokens); CPU, float32.",
        "",
        "| model | target | achieved | lm-eval word ppl | lm-eval byte ppl | lm-eval token ppl (same NLL) | "
        "tokens/word | hf-compress ppl | lm-eval wall s | ppl wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "word_perplexity" not in r:
            continue
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        lines.append(
            f"| {r['model']} | {pct(r['target_ratio'])} | {pct(r['achieved_ratio'])} | {r['word_perplexity']:.2f} | "
            f"{r['byte_perplexity']:.4f} | {r['lm_eval_token_perplexity']:.2f} | {r['tokens'] / r['words']:.3f} | "
            f"{r['ppl']:.2f} | {r['lm_eval_wall_s']:.0f} | {r['ppl_wall_s']:.0f} |"
        )
    zs = [r for r in records if r.get("zeroshot")]
    if zs:
        tasks = [t for t in zs[0]["zeroshot"] if t != "hfc_zeroshot"]
        lines += ["" if lines else f"CPU, float32, lm-eval {ZEROSHOT_NOTE}.", "",
                  f"Zero-shot acc / acc_norm (limit {args.zeroshot_limit} per task; mean acc over the 6 tasks, mean "
                  "acc_norm over the 5 that have it):", "",
                  "| model | " + " | ".join(tasks) + " | mean acc | mean acc_norm | wall s |", "|---" * (len(tasks) + 4) + "|"]
        for r in zs:
            cells, accs, norms = [], [], []
            for t in tasks:
                acc, norm = r["zeroshot"][t]["acc"], r["zeroshot"][t].get("acc_norm")
                accs.append(acc)
                norms += [norm] if norm is not None else []
                cells.append(f"{acc:.2f}" + (f" / {norm:.2f}" if norm is not None else ""))
            lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {sum(accs) / len(accs):.3f} | "
                         f"{sum(norms) / len(norms):.3f} | {r['zeroshot_wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="NAME=SPEC (SPEC: folder or 'smollm2').")
    parser.add_argument("--wikitext-docs", type=int, default=None, help="First N of the 62 articles (default all).")
    parser.add_argument("--max-length", type=int, default=2048, help="lm-eval rolling window (tokens).")
    parser.add_argument("--zeroshot-limit", type=int, default=0, help="Items per zero-shot task (0: skip).")
    parser.add_argument("--no-wikitext", action="store_true", help="Skip the perplexity part (zero-shot only).")
    parser.add_argument("--zeroshot-batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="quick", help="Results go to lm_eval_<tag>.json/.md.")
    parser.add_argument("--update-card", action="store_true", help="Record the numbers in checkpoint cards.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json, out_md = RESULTS / f"lm_eval_{args.tag}.json", RESULTS / f"lm_eval_{args.tag}.md"
    # Resume: models already measured under the same tag are kept, not re-run.
    records: list[dict] = json.loads(out_json.read_text())["records"] if out_json.exists() else []
    for item in args.model:
        name, _, spec = item.partition("=")
        if any(r["model"] == name for r in records):
            print(f"{name}: already in {out_json}, skipped", flush=True)
            continue
        record = bench_model(name, spec or name, args)
        records.append(record)
        print(json.dumps(record), flush=True)
        out_json.write_text(json.dumps({"args": vars(args), "records": records}, indent=2) + "\n")
        out_md.write_text(markdown(records, args))
    print(out_md.read_text())


if __name__ == "__main__":
    main()
