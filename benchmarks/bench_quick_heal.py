"""Protocol "quick-heal" of BENCHMARKS.md: SmolLM2-135M-Instruct converted with the default Basis Sharing settings
(protocol "quick"), then healed by distillation from the dense model on the C4 calibration documents.

    python benchmarks/bench_quick_heal.py run                 # the main rows (20/30/40% at 262,144 tokens, 20% at 131,072)
    python benchmarks/bench_quick_heal.py run --rows ablations  # at 20% and 131,072 tokens: LoRA, LM loss, KL+LM, no sequential
    python benchmarks/bench_quick_heal.py table               # rewrite the markdown table from the rows
    python benchmarks/bench_quick_heal.py chat --threads 1    # chat: dense + every student/healed checkpoint of the work dir
    python benchmarks/bench_quick_heal.py zeroshot --threads 1  # six zero-shot sets, 200 items: dense, 20% unhealed, 20% healed
    python benchmarks/report.py                               # then: tables, targets and the chat exchange in the READMEs

Stage "run", one row per healing run: the student (converted once per ratio and conversion setting, kept under
--work-dir), its WikiText-2 quick perplexity (first 20 windows of 2048) and C4-validation perplexity (documents
joined with "\\n\\n", first 20 windows of 2048) before and after healing, the healing's wall time, peak RSS, tokens/s
and trainable parameters, and the wall time of the conversion and healing calls as a user waits for them (loading,
the teacher's chat text and saving included). Healing saves a resumable state every 25 steps, and a finished row is
appended to `results/quick_heal.jsonl` at once, so the script may be stopped at any time and started again: it
continues with the first row not yet measured. Healing never sees an evaluation text: its data is the C4
*calibration* documents (a train shard).

Stage "chat": the dense source and every finished checkpoint of the work dir (`student-r*`, `healed-<row>`; smallest
ratio first, each unhealed student before its healed models) answer every prompt of `benchmarks/chat_prompts.json`
greedily, each as one user turn through the model's own chat template, with at most `--max-new-tokens` (48) new
tokens, float32; the answers are scored against the dense model's (`hf_compress.evaluation.chat.chat_metrics`: share
of non-empty answers, first-sentence exact match, the dense model's mean NLL per token of the answers). One row per
model goes to `results/quick_heal_chat.jsonl` as soon as it is measured, the answers themselves to
`results/quick_heal_chat_answers.json` (the dense answers are generated once and kept there); a rerun skips the
models already measured and never generates kept answers again. Rows and answers name the sha256 of the weights they
were measured on: a student converted again under the same name is refused until `--replace NAME` drops its row and
answers and measures it again.

Stage "zeroshot": lm-eval 0-shot on the six local sets (`hfc_zeroshot`, `--zeroshot-limit` items per set, batch 8,
float32) for `--models` (default: dense, student-r0.2 and every 20% model healed with 262,144 tokens and the KL on
the factors, plain or with chat text), one row per model (per-set acc / acc_norm,
their plain means, the sha256 of the weights) to `results/quick_heal_zeroshot.jsonl`; a model already there with
the same limit is skipped, and one there with other weights under the same name is refused.

`--threads 1` for chat and zeroshot while other jobs hold the cores: on a loaded 2-core machine two threads that
wait on each other made one forward of a student over 20x slower. The rows record the thread count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py beside it, also when loaded by path
from report import conversion_changes, gap_closed

RESULTS = Path(__file__).resolve().parent / "results"
ROWS_FILE = RESULTS / "quick_heal.jsonl"
TABLE_FILE = RESULTS / "quick_heal.md"
CHAT_ROWS_FILE = RESULTS / "quick_heal_chat.jsonl"
CHAT_ANSWERS_FILE = RESULTS / "quick_heal_chat_answers.json"
ZEROSHOT_ROWS_FILE = RESULTS / "quick_heal_zeroshot.jsonl"
STUDENTS_FILE = RESULTS / "quick_heal_students.json"
POSITIONS_FILE = RESULTS / "quick_heal_positions.json"
POSITIONS_TABLE = RESULTS / "quick_heal_positions.md"
# Where in the 2048-token windows the loss is counted: healing trains on 512-token chunks, so positions past 511
# are never trained on.
POSITION_BUCKET = 512
CHAT_PROMPTS_FILE = Path(__file__).resolve().parent / "chat_prompts.json"
EVAL_WINDOWS, EVAL_SEQ_LEN = 20, 2048
SOURCE, DENSE = "smollm2", "dense"
POSITION_MODELS = [DENSE, "student-r0.2", "healed-r0.2-131k", "healed-r0.2-262k-chat25-b64-bf16text"]
# 48 new tokens hold the first sentence of nearly every answer (what the exact match compares) and keep the chat
# stage of 5 models x 72 prompts to about half an hour on 2 CPU cores.
CHAT_MAX_NEW_TOKENS, CHAT_BATCH_SIZE = 48, 8
ZEROSHOT_LIMIT, ZEROSHOT_BATCH_SIZE = 200, 8
ZEROSHOT_RATIO, ZEROSHOT_BUDGET = 0.2, 262144
# What a row heals with unless it says otherwise: plain text, the KL alone, four sequences a step (the library's
# defaults when the rows were defined; it now defaults to `kl+lm`, two a step, and chat text for a chat model).
PROTOCOL_HEAL = {"chat_fraction": 0.0, "loss": "kl", "batch_size": 4}
# The library's defaults (`HealConfig`) as changes from `PROTOCOL_HEAL`, for this chat model: a quarter chat text
# (64 conversations at a time), the KL plus the cross-entropy, two sequences a step.
LIBRARY_HEAL = {"chat_fraction": 0.25, "chat_batch_size": 64, "loss": "kl+lm", "batch_size": 2}
# Row options that change only the healing data (the teacher's chat text and free text), not what trains or the loss.
DATA_OPTIONS = {"chat_fraction", "chat_batch_size", "free_text_fraction"}
# The conversion's default group size (layers that share one basis); rows name another to compare.
GROUP_SIZE = BasisSharingConfig().group_size


@dataclass(frozen=True)
class Row:
    """One healing run: the student's ratio and conversion setting, the budget and the healing options."""

    name: str
    ratio: float
    tokens: int
    heal: dict = field(default_factory=dict)
    sequential: bool = True
    calib_chat: float = 0.0  # share of the calibration samples that are the source's chat text
    group_size: int = GROUP_SIZE  # layers that share a basis (1: every layer its own factorisation, as SVD-LLM)

    @property
    def student(self) -> str:
        return student_name(self.ratio, self.sequential, self.calib_chat, self.group_size)


def student_name(ratio: float, sequential: bool = True, calib_chat: float = 0.0, group_size: int = GROUP_SIZE) -> str:
    """`student-r0.2`, `student-r0.2-nosequential`, `student-r0.2-calchat25`, `student-r0.2-g1` ...: the
    conversion's folder."""
    return (f"student-r{ratio:g}" + ("" if sequential else "-nosequential")
            + (f"-calchat{round(calib_chat * 100)}" if calib_chat else "")
            + ("" if group_size == GROUP_SIZE else f"-g{group_size}"))


def block_stage(tokens: int) -> dict:
    """The block-wise stage of the bench's rows on the run's first `tokens`: two passes at 2e-4."""
    return {"block_tokens": tokens, "block_epochs": 2, "block_lr": 2e-4}


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
        # Calibration where a quarter of the 128 samples are the source's free chat text (healing on plain text).
        Row("r0.2-131k-calchat25", 0.2, 131072, calib_chat=0.25),
    ],
    "chat": [
        # A quarter of the sequences written by the teacher through its chat template (free samples).
        Row("r0.2-131k-chat25", 0.2, 131072, {"chat_fraction": 0.25, "chat_batch_size": 16}),
        Row("r0.2-262k-chat25", 0.2, 262144, {"chat_fraction": 0.25, "chat_batch_size": 16}),
        # The same with the teacher writing 64 conversations at a time (16 above; the chat text differs with it).
        Row("r0.2-262k-chat25-b64", 0.2, 262144, {"chat_fraction": 0.25, "chat_batch_size": 64}),
        # The same options since the chat text is written by a bfloat16 copy of the teacher in bfloat16 runs, and with
        # a KV-cache loop that drops finished conversations (the row above: float32 and `generate`).
        Row("r0.2-262k-chat25-b64-bf16text", 0.2, 262144, {"chat_fraction": 0.25, "chat_batch_size": 64}),
        # The row above with the language-model loss added to the KL (better by 3.6% on WikiText-2 at 131,072 tokens
        # of plain text).
        Row("r0.2-262k-chat25-b64-kl+lm", 0.2, 262144, {"chat_fraction": 0.25, "chat_batch_size": 64, "loss": "kl+lm"}),
        # The same with two sequences a step (256 steps).
        Row("r0.2-262k-chat25-b64-kl+lm-b2", 0.2, 262144,
            LIBRARY_HEAL),
    ],
    # The learning rate at 20% and 131,072 tokens (1e-4 in the main rows); the loss still falls at the end of
    # every 1e-4 run. 3e-4 came out worse than 1e-4 (68.1 against 57.4 WikiText-2), so 1e-3 was not run.
    "lr": [
        Row("r0.2-131k-lr3e-4", 0.2, 131072, {"lr": 3e-4}),
        # Two sequences a step instead of four: the same tokens in twice the optimizer steps (128).
        Row("r0.2-131k-b2", 0.2, 131072, {"batch_size": 2}),
        # LoRA at a learning rate usual for adapters (at the factors' 1e-4 it heals far less: 87.5 against 57.4;
        # at 1e-3, 66.1).
        Row("r0.2-131k-lora-lr1e-3", 0.2, 131072, {"trainable": "lora", "lr": 1e-3}),
        # Half the learning rate, two sequences a step (the step after 3e-4 came out worse than 1e-4).
        Row("r0.2-131k-b2-lr5e-5", 0.2, 131072, {"batch_size": 2, "lr": 5e-5}),
        # The KL at temperature 2 (the teacher's smaller probabilities weigh more), two sequences a step.
        Row("r0.2-131k-b2-t2", 0.2, 131072, {"batch_size": 2, "temperature": 2.0}),
    ],
    # The library's healing defaults (HealConfig: kl+lm, two sequences a step, a quarter chat text for an instruct
    # source) at 30%, 40%, 10% and 50%; at 20% they are the row `r0.2-262k-chat25-b64-kl+lm-b2`.
    "defaults": [
        Row("r0.3-262k-chat25-b64-kl+lm-b2", 0.3, 262144,
            LIBRARY_HEAL),
        Row("r0.4-262k-chat25-b64-kl+lm-b2", 0.4, 262144,
            LIBRARY_HEAL),
        Row("r0.1-262k-chat25-b64-kl+lm-b2", 0.1, 262144,
            LIBRARY_HEAL),
        Row("r0.5-262k-chat25-b64-kl+lm-b2", 0.5, 262144,
            LIBRARY_HEAL),
    ],
    # The defaults at 20% plus the decoder layers' outputs matched to the teacher's (`hidden_weight`): at 5 the layer
    # term starts at about 0.77 (its mean relative distance 0.153 on the first batch), the KL at 1.14. It came out
    # worse than the defaults (WikiText-2 52.76 against 48.83), so no other weight was run.
    "layers": [
        Row("r0.2-262k-chat25-b64-kl+lm-b2-h5", 0.2, 262144,
            {**LIBRARY_HEAL, "hidden_weight": 5.0}),
    ],
    # The defaults at 20% with one sequence a step: the same tokens in twice the optimizer steps (512); two a step
    # healed better than four at 131,072 tokens (55.45 against 57.38 WikiText-2). One came out worse than two (49.84
    # against 48.83).
    "steps": [
        Row("r0.2-262k-chat25-b64-kl+lm-b1", 0.2, 262144,
            {**LIBRARY_HEAL, "batch_size": 1}),
    ],
    # The defaults at 20% with the factors balanced before training (`balance_factors`): the conversion leaves the
    # basis entries several times the coefficients', and AdamW moves every entry by about the learning rate.
    "balance": [
        Row("r0.2-262k-chat25-b64-kl+lm-b2-bal", 0.2, 262144,
            {**LIBRARY_HEAL, "balance_factors": True}),
        # The same at twice the peak learning rate: balanced, the coefficients no longer take the largest relative
        # steps (unbalanced, 3e-4 made the loss rise in its first steps). At 1e-4 balanced came out worse than the
        # defaults (49.70 against 48.83), at 2e-4 a little better (48.23).
        Row("r0.2-262k-chat25-b64-kl+lm-b2-bal-lr2e-4", 0.2, 262144,
            {**LIBRARY_HEAL, "balance_factors": True, "lr": 2e-4}),
        # Three times the peak rate, balanced: the next step of the trend from 1e-4 to 2e-4. It came out worse than
        # both (50.94).
        Row("r0.2-262k-chat25-b64-kl+lm-b2-bal-lr3e-4", 0.2, 262144,
            {**LIBRARY_HEAL, "balance_factors": True, "lr": 3e-4}),
    ],
    # The defaults at 20% with twice the budget (the calibration documents' plain text taken about one and a half
    # times): whether the budget is what holds 20% above 45 on WikiText-2.
    "budget": [
        Row("r0.2-524k-chat25-b64-kl+lm-b2", 0.2, 524288,
            LIBRARY_HEAL),
    ],
    # The defaults at 20% with a quarter of the sequences plain text the teacher writes freely (`free_text_fraction`;
    # the calibration documents then fill half): twice the budget improved C4 validation but not WikiText-2, so
    # whether text beyond the calibration documents' kind is what WikiText-2 lacks.
    "free text": [
        Row("r0.2-262k-chat25-free25-b64-kl+lm-b2", 0.2, 262144,
            {**LIBRARY_HEAL, "free_text_fraction": 0.25}),
    ],
    # The defaults at 20% with every weight trainable (`trainable="all"`: the embeddings and the tied head too, as in
    # the paper's full fine-tuning): whether the frozen embeddings are what holds the gap at about half.
    "all weights": [
        Row("r0.2-262k-chat25-b64-kl+lm-b2-all", 0.2, 262144,
            {**LIBRARY_HEAL, "trainable": "all"}),
    ],
    # The defaults at 20% after block-wise distillation (`block_tokens`): each pair of layers that shares bases first
    # trained alone to turn the student's hidden states into the teacher's, on the run's first 128 sequences, two
    # passes at 2e-4.
    "block-wise": [
        Row("r0.2-262k-chat25-b64-kl+lm-b2-blk64k", 0.2, 262144,
            {**LIBRARY_HEAL, **block_stage(65536)}),
        # The same stage, then the best end-to-end setting measured (balanced factors at 2e-4): whether the two
        # gains (the stage's and the balanced factors') add up. They do not: 47.35 WikiText-2, 46.06 C4 validation.
        Row("r0.2-262k-chat25-b64-kl+lm-b2-bal-lr2e-4-blk64k", 0.2, 262144,
            {**LIBRARY_HEAL, "balance_factors": True, "lr": 2e-4, **block_stage(65536)}),
        # Twice the stage's sequences (256, so 128 steps per block instead of 64): whether a longer stage, whose
        # blocks' errors still fell by only 15-20% in most blocks on 128 sequences, gives the training a better start.
        # It does: 46.05 WikiText-2, 44.95 C4 validation (20.8 min of stage).
        Row("r0.2-262k-chat25-b64-kl+lm-b2-blk128k", 0.2, 262144,
            {**LIBRARY_HEAL, **block_stage(131072)}),
        # The stage on every sequence of the run (512; 48.5 min of stage): the next step of that trend. It goes on:
        # 44.07 WikiText-2, 43.64 C4 validation (a float32 run, on a CPU without bfloat16; the others in bfloat16).
        Row("r0.2-262k-chat25-b64-kl+lm-b2-blk256k", 0.2, 262144,
            {**LIBRARY_HEAL, **block_stage(262144)}),
        # The stage on every sequence in one pass at 3e-4 (128 steps per block, as in the 131,072-token stage, but
        # each on sequences it has not seen): whether one pass over more sequences gives what two passes gave, at
        # about two thirds of the stage's cost. Neither: 45.69 WikiText-2, 44.63 C4 validation (two passes: 44.07,
        # 43.64; two over half the sequences: 46.05, 44.95), and 27.4 min of stage, more than two passes over half
        # the sequences took (20.8): each block's passes without training (in that run the teacher's, and the
        # student's before and after its training; the one before now covers 64 sequences) cover every sequence, so
        # they grow with the sequences, not with the passes.
        Row("r0.2-262k-chat25-b64-kl+lm-b2-blk256k-e1", 0.2, 262144,
            {**LIBRARY_HEAL, "block_tokens": 262144, "block_epochs": 1, "block_lr": 3e-4}),
        # The first stage, then the end-to-end training at half the default peak rate: whether the training at 1e-4
        # (the best rate from the conversion's start) undoes part of the better start the stage gives.
        Row("r0.2-262k-chat25-b64-kl+lm-b2-lr5e-5-blk64k", 0.2, 262144,
            {**LIBRARY_HEAL, "lr": 5e-5, **block_stage(65536)}),
    ],
    # The defaults at 20% on a conversion that shares no basis (`group_size=1`: every layer its own factorisation,
    # SVD-LLM's structure, at the same parameter count): whether the bases shared by two layers are what holds
    # healing at about half of the gap. It is not: 50.24 WikiText-2, 49.55 C4 validation (shared: 48.83, 48.21).
    "sharing": [
        Row("r0.2-262k-chat25-b64-kl+lm-b2-g1", 0.2, 262144, LIBRARY_HEAL, group_size=1),
        # The other way: bases shared by three layers (more rank per basis at the same parameter count), since one
        # healed worse than two. It heals worse on WikiText-2 too: 50.25 (2.9% above two), on C4 validation 47.85
        # (0.7% below), so groups of four were not run.
        Row("r0.2-262k-chat25-b64-kl+lm-b2-g3", 0.2, 262144, LIBRARY_HEAL, group_size=3),
    ],
    # The defaults at 20% trained in float32: the control for the block-wise row on every sequence, which ran in
    # float32 (on a CPU without bfloat16, where its conversion, cached under the student's name, was float32 too)
    # while every other 20% row of the defaults ran in bfloat16; whether the precision or the stage gave its gain.
    # The stage did: 48.46 WikiText-2, 48.21 C4 validation (bfloat16: 48.83, 48.21).
    "precision": [
        Row("r0.2-262k-chat25-b64-kl+lm-b2-f32", 0.2, 262144, {**LIBRARY_HEAL, "dtype": "float32"}),
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


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_jsonl(path: Path, row: dict) -> None:
    rows = read_jsonl(path) + [row]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_rows() -> list[dict]:
    return read_jsonl(ROWS_FILE)


def append_row(row: dict) -> None:
    append_jsonl(ROWS_FILE, row)


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
        started = time.perf_counter()
        result = convert("smollm2", folder,
                         BasisSharingConfig(ratio=row.ratio, sequential=row.sequential, group_size=row.group_size),
                         calibration=CalibrationConfig(dataset="c4-calibration", chat_fraction=row.calib_chat),
                         overwrite=True)
        atomic_write_json(work / f"{row.student}.convert.json",
                          {"wall_time_s": result.wall_time_s, "peak_rss_mb": result.peak_memory_mb,
                           "achieved_ratio": result.achieved_ratio, "timings": result.timings,
                           # the whole call, loading the source and saving included
                           "call_wall_time_s": time.perf_counter() - started})

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
    # The protocol heals on the C4 calibration documents: plain text unless the row asks for the teacher's chat text
    # (the library's default, "auto", would add it for this instruct teacher). A row's options are changes from
    # `PROTOCOL_HEAL`, the setting every row was defined against, not from the library's defaults of the day.
    config = HealConfig(tokens=row.tokens, **{**PROTOCOL_HEAL, **row.heal})
    if not figures_file.exists():
        # `heal` resumes from its state beside `healed` when an earlier run of this row was interrupted.
        started = time.perf_counter()
        with PeakMemory() as peak:
            result = heal(folder, healed, teacher="smollm2", config=config, overwrite=True)
        atomic_write_json(figures_file, {
            # `wall_time_s` counts the training steps only; the call also loads both models, has the teacher write
            # its chat text (rows with `chat_fraction`) and saves: what a user waits for
            "call_wall_time_s": time.perf_counter() - started if result.resumed_from == 0 else None,
            "wall_time_s": result.wall_time_s, "tokens_per_s_last_session": result.tokens_per_s,
            "resumed_from": result.resumed_from, "peak_rss_mb": peak.peak_mb, "trainable_params": result.trainable_params,
            "steps": result.steps, "tokens": result.tokens, "initial_loss": result.initial_loss,
            "final_loss": result.final_loss, "losses": result.losses, "dtype": config.resolve("cpu").dtype,
            # the block-wise stage before the loop (rows with `block_tokens`): its errors per block and its time
            **({"blockwise": result.provenance["healing"]["blockwise"]}
               if "blockwise" in result.provenance.get("healing", {}) else {})})
    heal_figures = json.loads(figures_file.read_text())
    model, tokenizer = load_causal_lm(str(healed))
    after = evaluator_of(tokenizer)(model)
    return {
        "row": row.name, "ratio": row.ratio, "achieved_ratio": before["conversion"]["achieved_ratio"],
        "budget_tokens": row.tokens, "sequential": row.sequential, "calib_chat_fraction": row.calib_chat,
        "group_size": row.group_size, "heal_options": config.to_dict(),
        "wikitext2_before": before["wikitext2"], "wikitext2_after": after["wikitext2"],
        "c4_before": before["c4"], "c4_after": after["c4"],
        "conversion_wall_time_s": before["conversion"]["wall_time_s"],
        "conversion_call_wall_time_s": before["conversion"].get("call_wall_time_s"),
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
    lines += [("| row | ratio | budget (tokens) | trainable params | WikiText-2 before -> after | WikiText-2 gap closed "
              "| C4 val before -> after | C4 after / dense | C4 gap closed | heal wall (s) | tokens/s "
              "| heal peak RSS (MB) |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c4_vs_dense = f"{r['c4_after'] / dense['c4']:.2f}x" if dense else "-"
        closed = {name: f"{gap_closed(r[f'{name}_before'], r[f'{name}_after'], dense[name]):.0%}" if dense else "-"
                  for name in ("wikitext2", "c4")}
        lines.append(
            f"| {r['row']} | {r['ratio']:.0%} | {r['budget_tokens']:,} | {r['heal_trainable_params']:,} "
            f"| {r['wikitext2_before']:.2f} -> {r['wikitext2_after']:.2f} | {closed['wikitext2']} "
            f"| {r['c4_before']:.2f} -> {r['c4_after']:.2f} | {c4_vs_dense} | {closed['c4']} "
            f"| {r['heal_wall_time_s']:.0f} | {r['heal_tokens_per_s']:.0f} | {r['heal_peak_rss_mb']:,.0f} |")
    lines += ["", ("Protocol \"quick-heal\" (BENCHMARKS.md); rows in `quick_heal.jsonl`. Healing data: the C4 calibration "
              "documents in 512-token chunks, seed-2023 order; evaluation texts are never trained on."),
              "", ("Gap closed: the share of the log-perplexity gap between the student and the dense model that "
                   "healing removed, `log(before / after) / log(before / dense)`; 100% would be the dense model's "
                   "perplexity.")]
    if note:
        lines += ["", note]
    atomic_write_text(TABLE_FILE, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------- chat, zero-shot
@dataclass(frozen=True)
class BenchModel:
    """One model of the chat and zero-shot stages: the dense source, an unhealed student or a healed one."""

    name: str
    spec: str  # what `load_causal_lm` / `resolve_source` take: the source ("smollm2") or a checkpoint folder
    ratio: float
    kind: str  # "dense", "unhealed" or "healed"
    sequential: bool = True
    heal_row: str | None = None
    budget_tokens: int | None = None
    heal_options: dict = field(default_factory=dict)
    calib_chat: float = 0.0
    group_size: int = GROUP_SIZE

    def describe(self) -> dict:
        return {"model": self.name, "kind": self.kind, "ratio": self.ratio, "sequential": self.sequential,
                "calib_chat_fraction": self.calib_chat, "group_size": self.group_size, "heal_row": self.heal_row,
                "budget_tokens": self.budget_tokens, "heal_options": self.heal_options}


_STUDENT = re.compile(r"student-r([0-9.]+)(-nosequential)?(?:-calchat([0-9]+))?(?:-g([0-9]+))?")


def bench_models(work: Path, source: str = SOURCE) -> list[BenchModel]:
    """The dense source, then every finished checkpoint of the work dir (a folder with a config.json: `student-r*`
    and `healed-<row of ROWS>`), by ratio, each unhealed student before its healed models (smaller budget first).
    Hidden folders (healing states, staging folders) and folders of unknown rows are left out."""
    every = {row.name: row for rows in ROWS.values() for row in rows}
    found = []
    for folder in sorted(work.iterdir()) if work.is_dir() else []:
        if folder.name.startswith(".") or not (folder / "config.json").is_file():
            continue
        match = _STUDENT.fullmatch(folder.name)
        row = every.get(folder.name.removeprefix("healed-")) if folder.name.startswith("healed-") else None
        if match:
            found.append(BenchModel(folder.name, str(folder), float(match.group(1)), "unhealed",
                                    sequential=not match.group(2),
                                    calib_chat=int(match.group(3)) / 100 if match.group(3) else 0.0,
                                    group_size=int(match.group(4)) if match.group(4) else GROUP_SIZE))
        elif row is not None:
            found.append(BenchModel(folder.name, str(folder), row.ratio, "healed", sequential=row.sequential,
                                    heal_row=row.name, budget_tokens=row.tokens, heal_options=dict(row.heal),
                                    calib_chat=row.calib_chat, group_size=row.group_size))
    found.sort(key=lambda m: (m.ratio, m.kind == "healed", m.budget_tokens or 0, m.name))
    return [BenchModel(DENSE, source, 0.0, "dense")] + found


def pick_models(models: list[BenchModel], names, work: Path) -> list[BenchModel]:
    if names is None:
        return models
    known = {m.name: m for m in models}
    missing = [name for name in names if name not in known]
    if missing:
        raise SystemExit(f"no finished checkpoint {', '.join(missing)} in {work} (present: {', '.join(known)})")
    return [known[name] for name in dict.fromkeys(names)]  # a name given twice is measured once


def checkpoint_sha256(m: BenchModel) -> str | None:
    """sha256 of a checkpoint's weight files (None for the dense source): what ties a measured row to the weights it
    was measured on, since a student may be converted again under the same folder name."""
    from hf_compress.provenance import file_sha256

    if m.kind == "dense":
        return None
    weights = sorted(Path(m.spec).glob("*.safetensors"))
    return hashlib.sha256("".join(file_sha256(path) for path in weights).encode()).hexdigest()


def measured_elsewhere(models: list[BenchModel], digests: dict[str, str | None], *records: dict) -> list[str]:
    """The models whose stored record (rows or answers, by model name) names other weights than their checkpoint
    holds now. Records from before the digest was kept are taken as they are."""
    return [m.name for m in models if any(record.get(m.name, {}).get("checkpoint_sha256") not in
                                          (None, digests[m.name]) for record in records)]


def load_prompts(path: Path) -> list[str]:
    prompts = json.loads(Path(path).read_text())
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) and p.strip() for p in prompts)):
        raise SystemExit(f"{path}: expected a JSON list of non-empty prompt strings")
    return prompts


def prompts_sha256(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


def _finite(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def chat_stage(work: Path, *, source: str = SOURCE, names=None, prompts_file: Path | None = None,
               rows_file: Path | None = None, answers_file: Path | None = None,
               max_new_tokens: int = CHAT_MAX_NEW_TOKENS, batch_size: int = CHAT_BATCH_SIZE, note: str = "",
               replace=(), log=print) -> list[dict]:
    """Greedy chat answers of every model (`bench_models`) to every prompt, scored against the dense model's; one
    row per model appended to `rows_file`, the answers kept in `answers_file`, each with the sha256 of the weights.
    Models with a row are skipped, and answers already in `answers_file` are not generated again (the dense ones are
    generated once); a model whose row or answers name other weights than its checkpoint holds now is refused, unless
    named in `replace`: its row and answers are dropped and measured again. Returns the rows this call appended."""
    from hf_compress.evaluation.chat import chat_metrics, generate_chat_outputs
    from hf_compress.sources import load_causal_lm

    rows_file = rows_file or CHAT_ROWS_FILE
    answers_file = answers_file or CHAT_ANSWERS_FILE
    prompts_file = Path(prompts_file or CHAT_PROMPTS_FILE)
    prompts = load_prompts(prompts_file)
    settings = {"prompts_file": prompts_file.name, "prompts_sha256": prompts_sha256(prompts), "prompts": len(prompts),
                "max_new_tokens": max_new_tokens, "batch_size": batch_size, "decoding": "greedy", "dtype": "float32"}
    store = json.loads(answers_file.read_text()) if answers_file.exists() else {**settings, "prompt_texts": prompts,
                                                                               "models": {}}
    stale = {k: (store.get(k), v) for k, v in settings.items() if store.get(k) != v}
    stale.update({f"row {r['model']}: {k}": (r.get(k), v) for r in read_jsonl(rows_file) for k, v in settings.items()
                  if r.get(k) != v})
    if stale:
        raise SystemExit(f"{answers_file.name} / {rows_file.name} were measured with other settings "
                         f"({'; '.join(f'{k}: {old!r}, now {new!r}' for k, (old, new) in stale.items())}); move both "
                         "away to measure again.")
    models = pick_models(bench_models(work, source), names, work)
    replace = set(replace)
    if replace - {m.name for m in models}:
        raise SystemExit(f"--replace {', '.join(sorted(replace - {m.name for m in models}))}: not among the models "
                         f"of this call ({', '.join(m.name for m in models)})")
    stored = read_jsonl(rows_file)
    kept_rows = [r for r in stored if r["model"] not in replace]
    if len(kept_rows) < len(stored):
        atomic_write_text(rows_file, "".join(json.dumps(r) + "\n" for r in kept_rows))
    if replace & set(store["models"]):
        store["models"] = {name: kept for name, kept in store["models"].items() if name not in replace}
        atomic_write_json(answers_file, store)
    digests = {m.name: checkpoint_sha256(m) for m in models}
    measured = {r["model"]: r for r in kept_rows}
    elsewhere = measured_elsewhere(models, digests, measured, store["models"])
    if elsewhere:
        raise SystemExit(f"{', '.join(elsewhere)}: measured on other weights than the work dir holds now (converted "
                         f"or healed again); measure again with --replace {' '.join(elsewhere)}")
    todo = [m for m in models if m.name not in measured]
    for m in models:
        if m not in todo:
            log(f"chat {m.name}: already measured")
    if not todo:
        return []
    loaded: dict = {}

    def teacher():
        if "dense" not in loaded:
            loaded["dense"] = load_causal_lm(source)
        return loaded["dense"]

    def answers_of(m: BenchModel) -> dict:
        if m.name not in store["models"]:
            model, tokenizer = teacher() if m.kind == "dense" else load_causal_lm(m.spec)
            started = time.perf_counter()
            outputs = generate_chat_outputs(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                            batch_size=batch_size)
            wall = time.perf_counter() - started
            store["models"][m.name] = {"spec": m.spec if m.kind == "dense" else Path(m.spec).name,
                                       "answers": [o["answer"] for o in outputs],
                                       "tokens": [o["tokens"] for o in outputs],
                                       "finished": [o["finished"] for o in outputs], "wall_time_s": wall,
                                       "threads": torch.get_num_threads(), "checkpoint_sha256": digests[m.name]}
            atomic_write_json(answers_file, store)
            log(f"chat {m.name}: {len(prompts)} answers in {wall:.0f} s")
        return store["models"][m.name]

    dense = answers_of(next(m for m in bench_models(work, source) if m.kind == "dense"))
    appended = []
    for m in todo:
        got = answers_of(m)
        started = time.perf_counter()
        model, tokenizer = teacher()
        metrics = chat_metrics(got["answers"], dense["answers"], model, tokenizer, prompts, batch_size=batch_size)
        row = {**m.describe(), **settings, **metrics, "teacher_nll": _finite(metrics["teacher_nll"]),
               "cut_at_limit": sum(not f for f in got["finished"]) / len(prompts),
               "generated_tokens": sum(got["tokens"]), "generation_wall_time_s": got["wall_time_s"],
               "generated_tokens_per_s": sum(got["tokens"]) / got["wall_time_s"] if got["wall_time_s"] else None,
               "metrics_wall_time_s": time.perf_counter() - started, "hf_compress_version": __version__,
               "threads": got["threads"], "checkpoint_sha256": digests[m.name], "note": note}
        append_jsonl(rows_file, row)
        appended.append(row)
        nll = "-" if row["teacher_nll"] is None else f"{row['teacher_nll']:.3f}"
        log(f"chat {m.name}: non-empty {row['non_empty']:.1%}, first sentence = dense {row['first_sentence_match']:.1%}, "
            f"teacher NLL {nll}")
    return appended


ZEROSHOT_METRICS = ("acc", "acc_norm")


def zeroshot_row(m: BenchModel, results: dict, limit: int) -> dict:
    """One row of the zero-shot stage from lm-eval's results: acc (and acc_norm where the set has it) and the item
    count of each of the six sets, their plain (unweighted) means, lm-eval's own group figure and the wall time."""
    from hf_compress.evaluation.tasks import ZEROSHOT_GROUP, ZEROSHOT_SETS

    per_task = {}
    for task in ZEROSHOT_SETS:
        metrics = results["results"][task]
        per_task[task] = {name: metrics[f"{name},none"] for name in ZEROSHOT_METRICS if f"{name},none" in metrics}
        per_task[task]["n"] = (results.get("n-samples", {}).get(task) or {}).get("effective")
    accs = [t["acc"] for t in per_task.values()]
    norms = [t["acc_norm"] for t in per_task.values() if "acc_norm" in t]
    info = results.get("hf_compress", {})
    return {**m.describe(), "limit": limit, "tasks": per_task, "mean_acc": sum(accs) / len(accs),
            "mean_acc_norm": sum(norms) / len(norms) if norms else None,
            "group_acc": results["results"].get(ZEROSHOT_GROUP, {}).get("acc,none"),
            "batch_size": info.get("batch_size"), "dtype": info.get("dtype"), "device": info.get("device"),
            "wall_time_s": info.get("wall_time_s"), "lm_eval_version": results.get("lm_eval_version"),
            "hf_compress_version": __version__, "threads": torch.get_num_threads()}


def zeroshot_models(models: list[BenchModel]) -> list[BenchModel]:
    """The zero-shot stage's default models: the dense one, the unhealed student at `ZEROSHOT_RATIO` and every
    model healed from it with the full budget and the default objective, whatever its data mix (plain text, or with
    the teacher's chat text: the library's default for a chat model)."""
    return [m for m in models if m.kind == "dense" or (
        math.isclose(m.ratio, ZEROSHOT_RATIO) and not conversion_changes(m.describe())
        and (m.kind == "unhealed"
             or (m.budget_tokens == ZEROSHOT_BUDGET and set(m.heal_options) <= DATA_OPTIONS)))]


def zeroshot_stage(work: Path, *, source: str = SOURCE, names=None, limit: int = ZEROSHOT_LIMIT,
                   batch_size: int = ZEROSHOT_BATCH_SIZE, device: str = "cpu", rows_file: Path | None = None,
                   note: str = "", log=print) -> list[dict]:
    """lm-eval 0-shot on the six local sets (`hfc_zeroshot`, `limit` items each) for the named models (default:
    `zeroshot_models`), one row per model appended to `rows_file`; a model with a row of the same limit is
    skipped. Returns the rows appended."""
    from hf_compress.evaluation.lm_eval import run_lm_eval
    from hf_compress.evaluation.tasks import ZEROSHOT_GROUP
    from hf_compress.sources import resolve_source

    rows_file = rows_file or ZEROSHOT_ROWS_FILE
    appended = []
    models = bench_models(work, source)
    models = pick_models(models, names, work) if names else zeroshot_models(models)
    digests = {m.name: checkpoint_sha256(m) for m in models}
    stored = read_jsonl(rows_file)
    elsewhere = measured_elsewhere(models, digests, *({r["model"]: r} for r in stored))
    if elsewhere:
        raise SystemExit(f"{', '.join(elsewhere)}: zero-shot rows in {rows_file.name} measured on other weights than "
                         "the work dir holds now (converted or healed again); move those rows away to measure again")
    for m in models:  # each model once: the rows this loop appends never answer for a later model
        if any(r["model"] == m.name and r["limit"] == limit for r in stored):
            log(f"zeroshot {m.name}: already measured (limit {limit})")
            continue
        path, gguf_file = resolve_source(m.spec)
        results = run_lm_eval(path, [ZEROSHOT_GROUP], limit=limit, gguf_file=gguf_file, batch_size=batch_size,
                              device=device)
        row = {**zeroshot_row(m, results, limit), "checkpoint_sha256": digests[m.name], "note": note}
        append_jsonl(rows_file, row)
        appended.append(row)
        log(f"zeroshot {m.name}: mean acc {row['mean_acc']:.3f} ({row['wall_time_s']:.0f} s)")
    return appended


def position_nll(model, ids: torch.Tensor, *, seq_len: int = EVAL_SEQ_LEN, max_windows: int = EVAL_WINDOWS,
                 logit_chunk: int = 256) -> torch.Tensor:
    """Summed next-token NLL at each position of the windows `window_losses` evaluates (`seq_len - 1` values,
    position `t` predicting token `t + 1`), over the first `max_windows` windows, in float64."""
    head, base = model.get_output_embeddings(), model.base_model
    totals = torch.zeros(seq_len - 1, dtype=torch.float64)
    windows = min(ids.numel() // seq_len, max_windows)
    with torch.no_grad():
        for window in range(windows):
            chunk = ids[window * seq_len:(window + 1) * seq_len].unsqueeze(0)
            hidden = base(input_ids=chunk, use_cache=False).last_hidden_state[0, :-1]
            targets = chunk[0, 1:]
            for start in range(0, hidden.shape[0], logit_chunk):
                piece = slice(start, start + logit_chunk)
                logits = head(hidden[piece]).float()
                totals[piece] += torch.nn.functional.cross_entropy(logits, targets[piece], reduction="none").double()
    return totals / windows


def bucket_perplexities(nll: torch.Tensor, bucket: int = POSITION_BUCKET) -> list[float]:
    """Perplexity over positions `[0, bucket)`, `[bucket, 2 * bucket)` ... of per-position mean NLLs."""
    return [math.exp(nll[start:start + bucket].mean().item()) for start in range(0, nll.numel(), bucket)]


def positions_stage(work: Path, *, source: str = SOURCE, names=None, out_file: Path | None = None,
                    table_file: Path | None = None, note: str = "", log=print) -> dict:
    """WikiText-2 and C4-validation perplexity of each model by where in the 2048-token window the predicted token
    sits (buckets of `POSITION_BUCKET`): whether what healing leaves is spread evenly or sits past the positions it
    trains on. Measured models are kept in `out_file` and not measured again; the table is rewritten."""
    from hf_compress.sources import load_causal_lm

    out_file, table_file = Path(out_file or POSITIONS_FILE), Path(table_file or POSITIONS_TABLE)
    store = json.loads(out_file.read_text()) if out_file.exists() else {"bucket": POSITION_BUCKET, "models": {}}
    evaluator = None
    for m in pick_models(bench_models(work, source), names or POSITION_MODELS, work):
        if m.name in store["models"]:
            log(f"positions {m.name}: already measured")
            continue
        model, tokenizer = load_causal_lm(m.spec)
        model.eval()
        evaluator = evaluator or Evaluator(tokenizer)
        started = time.perf_counter()
        store["models"][m.name] = {
            **m.describe(),
            **{name: bucket_perplexities(position_nll(model, ids)) for name, ids in evaluator.ids.items()},
            "wall_time_s": time.perf_counter() - started, "note": note}
        atomic_write_json(out_file, store)
        log(f"positions {m.name}: {store['models'][m.name]['wikitext2']}")
    atomic_write_text(table_file, positions_table(store))
    return store


def positions_table(store: dict) -> str:
    """Markdown: per text, each model's perplexity by position bucket, and its ratio to the dense model's."""
    bucket, models = store["bucket"], store["models"]
    first = next(iter(models.values()))
    spans = [f"{start}-{start + bucket - 1}" for start in range(0, bucket * len(first["wikitext2"]), bucket)]
    lines = ["# quick-heal: perplexity by position in the 2048-token window", "",
             f"Predicted-token positions in buckets of {bucket} (healing trains on {bucket}-token chunks: positions "
             f"from {bucket} on are never trained on). `bench_quick_heal.py positions`; values in "
             f"`{POSITIONS_FILE.name}`.", ""]
    dense = models.get(DENSE)
    for text, title in (("wikitext2", "WikiText-2 quick"), ("c4", "C4 validation")):
        lines += [f"{title} (first {EVAL_WINDOWS} windows):", "",
                  "| model | " + " | ".join(spans) + " | last / first bucket, x dense |",
                  "|---|" + "---|" * (len(spans) + 1)]
        for name, row in models.items():
            cells = [f"{v:.2f}" + (f" ({v / d:.2f}x)" if dense and name != DENSE else "")
                     for v, d in zip(row[text], dense[text] if dense else row[text])]
            drift = "-" if not dense or name == DENSE else \
                f"{(row[text][-1] / dense[text][-1]) / (row[text][0] / dense[text][0]):.2f}"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {drift} |")
        lines.append("")
    notes = sorted({row["note"] for row in models.values() if row.get("note")})
    return "\n".join(lines + [f"Note: {n}" for n in notes]).rstrip() + "\n"


def students_stage(work: Path, rows: list[Row], evaluator_of, *, out_file: Path | None = None,
                   note: str = "") -> dict:
    """Each row's student converted (once) and evaluated, without healing: its perplexities and conversion figures
    kept in `out_file` by student name (what a conversion setting does before any healing)."""
    out_file = Path(out_file or STUDENTS_FILE)
    store = json.loads(out_file.read_text()) if out_file.exists() else {}
    for row in rows:
        if row.student in store:
            continue
        _, figures = student(row, work, evaluator_of)
        store[row.student] = {"ratio": row.ratio, "sequential": row.sequential, "calib_chat_fraction": row.calib_chat,
                              "group_size": row.group_size,
                              "wikitext2": figures["wikitext2"], "c4": figures["c4"],
                              "conversion": figures["conversion"], "note": note}
        atomic_write_json(out_file, store)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["run", "students", "table", "chat", "zeroshot", "positions"])
    parser.add_argument("--rows", nargs="+", default=["main"], help=f"row sets ({', '.join(ROWS)}) or row names")
    parser.add_argument("--work-dir", default=os.path.expanduser("~/.cache/hf-compress-bench/quick_heal"),
                        help="students, healed checkpoints and resumable states")
    parser.add_argument("--note", default="", help="written under the table (e.g. other jobs on the machine)")
    parser.add_argument("--models", nargs="+", default=None,
                        help=f"chat/zeroshot: these models only ({DENSE}, or checkpoint folder names of the work dir; "
                             "default: all for chat; for zeroshot the dense model, the 20%% student and the 20%% "
                             "models healed with 262,144 tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=CHAT_MAX_NEW_TOKENS, help="chat: tokens per answer")
    parser.add_argument("--chat-batch-size", type=int, default=CHAT_BATCH_SIZE, help="chat: prompts per batch")
    parser.add_argument("--replace", nargs="+", default=(),
                        help="chat: drop these models' stored rows and answers and measure them again (a student "
                             "converted again since)")
    parser.add_argument("--zeroshot-limit", type=int, default=ZEROSHOT_LIMIT, help="zeroshot: items per set")
    parser.add_argument("--zeroshot-batch-size", type=int, default=ZEROSHOT_BATCH_SIZE)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 is much faster while other jobs hold the cores")
    args = parser.parse_args()
    if args.replace and args.stage != "chat":
        parser.error("--replace is an option of the chat stage")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.stage == "table":
        write_table(work, args.note)
        return
    if args.stage == "chat":
        chat_stage(work, names=args.models, max_new_tokens=args.max_new_tokens, batch_size=args.chat_batch_size,
                   note=args.note, replace=args.replace, log=lambda line: print(line, flush=True))
        return
    if args.stage == "positions":
        positions_stage(work, names=args.models, note=args.note, log=lambda line: print(line, flush=True))
        return
    if args.stage == "zeroshot":
        zeroshot_stage(work, names=args.models, limit=args.zeroshot_limit,
                       batch_size=args.zeroshot_batch_size, note=args.note, log=lambda line: print(line, flush=True))
        return
    every = {row.name: row for rows in ROWS.values() for row in rows}
    unknown = [name for name in args.rows if name not in ROWS and name not in every]
    if unknown:
        parser.error(f"unknown row or row set: {', '.join(unknown)} (row sets: {', '.join(ROWS)})")
    wanted = [row for name in args.rows for row in (ROWS[name] if name in ROWS else [every[name]])]
    evaluators: dict = {}

    def evaluator_of(tokenizer) -> Evaluator:
        if "e" not in evaluators:
            evaluators["e"] = Evaluator(tokenizer)
        return evaluators["e"]

    dense = dense_eval(work, evaluator_of)
    atomic_write_json(RESULTS / "quick_heal_dense.json", dense)
    print(f"dense: {dense}", flush=True)
    if args.stage == "students":
        for name, figures in students_stage(work, wanted, evaluator_of, note=args.note).items():
            print(f"{name}: WikiText-2 {figures['wikitext2']:.2f}, C4 {figures['c4']:.2f}", flush=True)
        return
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
