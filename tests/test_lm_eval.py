"""lm-evaluation-harness integration: the offline tasks, results JSON, model-card update, CLI."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hf_compress.errors import HFCompressError
from hf_compress.evaluation.tasks.utils import split_articles, wikitext_detokenizer

WIKI_LINES = [
    "", " = Alpha = \n", "", " The quick brown fox jumps over the lazy dog . \n", "",
    " = = History = = \n", "", " Compression keeps the most useful directions . \n", "",
    " = Beta = \n", "", " A shared basis serves two consecutive layers @-@ each keeps its own coefficients . \n",
]
PIQA_ROWS = {
    "goal": ["keep a dog", "compress a model", "share a basis", "jump over a fox"],
    "sol1": ["feed it every day", "remove useful directions", "use two layers", "the quick brown fox"],
    "sol2": ["never feed it", "keep useful directions", "use one layer", "the lazy dog"],
    "label": [0, 1, 0, 1],
}


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    (root / "wikitext-2-raw-v1").mkdir(parents=True)
    pq.write_table(pa.table({"text": WIKI_LINES}), root / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet")
    (root / "zeroshot" / "piqa").mkdir(parents=True)
    pq.write_table(pa.table(PIQA_ROWS), root / "zeroshot" / "piqa" / "validation-00000-of-00001.parquet")
    monkeypatch.setenv("HF_COMPRESS_DATA", str(root))
    return root


@pytest.fixture
def model_dir(tiny_shared_basis_checkpoint, tmp_path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny_shared_basis_checkpoint, target)
    return target


def test_articles_are_rebuilt_from_lines():
    pages = split_articles(WIKI_LINES)
    assert pages == [
        " = Alpha = \n\n The quick brown fox jumps over the lazy dog . \n\n = = History = = \n\n"
        " Compression keeps the most useful directions . \n",
        " = Beta = \n\n A shared basis serves two consecutive layers @-@ each keeps its own coefficients . \n",
    ]


def _reference_logprobs(model_dir: Path):
    """Next-token log-probabilities of the checkpoint, computed here without lm-eval."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def loglikelihood(context_ids: list[int], target_ids: list[int]) -> float:
        ids = torch.tensor([context_ids + target_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        positions = range(len(context_ids) - 1, len(context_ids) + len(target_ids) - 1)
        return sum(logprobs[p, t].item() for p, t in zip(positions, target_ids))

    return tokenizer, loglikelihood


def test_wikitext_and_piqa_match_an_independent_computation(model_dir, data_dir):
    from hf_compress.evaluation.lm_eval import card_entries, evaluate

    results, path = evaluate(model_dir, ["hfc_wikitext2", "hfc_piqa"], batch_size=1, update_card=True)
    assert path == model_dir / "lm_eval_results.json"
    saved = json.loads(path.read_text())
    assert saved["results"]["hfc_piqa"]["acc,none"] == results["results"]["hfc_piqa"]["acc,none"]

    tokenizer, loglikelihood = _reference_logprobs(model_dir)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    # Word perplexity = exp(-total log-likelihood / words), each article scored from a lone prefix token.
    total_ll, words = 0.0, 0
    for page in split_articles(WIKI_LINES):
        ids = tokenizer(wikitext_detokenizer({"page": page}), add_special_tokens=False).input_ids
        assert len(ids) < 200  # one window: no rolling context involved
        total_ll += loglikelihood([prefix], ids)
        words += len(re.split(r"\s+", page))
    expected_word_ppl = math.exp(-total_ll / words)
    assert results["results"]["hfc_wikitext2"]["word_perplexity,none"] == pytest.approx(expected_word_ppl, rel=1e-4)

    # PIQA 0-shot: the choice with the highest log-likelihood after "Question: ...\nAnswer:" (acc), per character
    # of the choice (acc_norm).
    hits = hits_norm = 0
    for goal, sol1, sol2, label in zip(*PIQA_ROWS.values()):
        context = f"Question: {goal}\nAnswer:"
        context_ids = tokenizer(context, add_special_tokens=False).input_ids
        scores = []
        for choice in (" " + sol1, " " + sol2):
            whole = tokenizer(context + choice, add_special_tokens=False).input_ids
            scores.append(loglikelihood(context_ids, whole[len(context_ids):]))
        hits += int(max(range(2), key=lambda i: scores[i]) == label)
        norm = [scores[i] / len(c) for i, c in enumerate((" " + sol1, " " + sol2))]
        hits_norm += int(max(range(2), key=lambda i: norm[i]) == label)
    assert results["results"]["hfc_piqa"]["acc,none"] == pytest.approx(hits / 4)
    assert results["results"]["hfc_piqa"]["acc_norm,none"] == pytest.approx(hits_norm / 4)

    # --update-card: the same numbers in eval_results.json and as model-index entries of the card.
    from huggingface_hub import ModelCard

    entries = {(e["task_name"], e["metric_type"]): e["metric_value"] for e in card_entries(results)}
    assert entries[("hfc_wikitext2", "word_perplexity")] == pytest.approx(expected_word_ppl, rel=1e-4)
    assert entries[("hfc_piqa", "acc")] == pytest.approx(hits / 4)
    card = ModelCard.load(model_dir / "README.md")
    index = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert index[("wikitext", "word_perplexity")] == pytest.approx(expected_word_ppl, rel=1e-4)
    assert index[("baber/piqa", "acc_norm")] == pytest.approx(hits_norm / 4)


def test_cli_eval_with_limit(model_dir, data_dir):
    from typer.testing import CliRunner

    from hf_compress.cli import app

    out = model_dir / "piqa.json"
    result = CliRunner().invoke(app, ["eval", str(model_dir), "--tasks", "hfc_piqa", "--limit", "2",
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["n-samples"]["hfc_piqa"] == {"original": 4, "effective": 2}
    assert saved["hf_compress"]["limit"] == 2
    assert re.search(r"hfc_piqa: acc [01]\.\d{4}", result.output)
    assert not (model_dir / "eval_results.json").exists()  # no --update-card: the card is left alone


def test_bad_requests_fail_before_loading_the_model(model_dir, data_dir, tmp_path, monkeypatch):
    from hf_compress.evaluation.lm_eval import evaluate, run_lm_eval

    with pytest.raises(HFCompressError, match="has no config.json"):
        run_lm_eval(tmp_path, ["hfc_piqa"])
    with pytest.raises(HFCompressError, match="needs a local checkpoint folder"):
        evaluate("someone/on-the-hub", ["hfc_piqa"], update_card=True)
    with pytest.raises(HFCompressError, match="pass --output"):
        evaluate("someone/on-the-hub", ["hfc_piqa"])
    with pytest.raises(HFCompressError, match="GGUF file: pass --output"):
        evaluate(model_dir, ["hfc_piqa"], gguf_file="model.gguf")
    monkeypatch.setenv("HF_COMPRESS_DATA", str(tmp_path / "empty"))
    with pytest.raises(HFCompressError, match=r"local task data missing .*zeroshot/arc_easy"):
        run_lm_eval(model_dir, ["hfc_zeroshot"])


@pytest.mark.slow
def test_unknown_task_names_are_refused(model_dir):
    """Other names pass through to lm-eval's own index (built here, which takes a while)."""
    from hf_compress.evaluation.lm_eval import run_lm_eval

    with pytest.raises(HFCompressError, match=r"unknown lm-eval task\(s\) \['no_such_task'\]"):
        run_lm_eval(model_dir, ["hfc_piqa", "no_such_task"])


def test_task_dir_includes_builtin_tasks_and_local_files(data_dir, tmp_path):
    import yaml

    from hf_compress.evaluation.tasks import ZEROSHOT_SETS, prepare_task_dir

    out = prepare_task_dir(tmp_path / "tasks")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{name}.yaml" for name in ZEROSHOT_SETS] + ["hfc_wikitext2.yaml", "hfc_zeroshot.yaml"])
    arc = yaml.safe_load((out / "hfc_arc_challenge.yaml").read_text())
    assert arc["include"].endswith("lm_eval/tasks/arc/arc_challenge.yaml") and Path(arc["include"]).is_file()
    assert arc["dataset_kwargs"]["data_files"] == {"test": str(data_dir / "zeroshot/arc_challenge/test-00000-of-00001.parquet")}
    assert arc["test_split"] == "test" and arc["validation_split"] is None and arc["tag"] == []


@pytest.mark.slow
def test_six_zero_shot_sets_run_offline_and_group_is_the_plain_mean(model_dir):
    """The real local files (../shared/data/zeroshot) through lm-eval's own prompts, 2 items per task."""
    from hf_compress.evaluation.lm_eval import ZEROSHOT_GROUP, ZEROSHOT_SETS, run_lm_eval

    results = run_lm_eval(model_dir, [ZEROSHOT_GROUP], limit=2, batch_size=4)
    per_task = results["results"]
    assert set(per_task) == {ZEROSHOT_GROUP, *ZEROSHOT_SETS}
    assert all(results["n-samples"][task]["effective"] == 2 for task in ZEROSHOT_SETS)
    assert results["n-samples"]["hfc_mathqa"]["original"] == 2985 and results["n-samples"]["hfc_piqa"]["original"] == 1838
    mean = sum(per_task[task]["acc,none"] for task in ZEROSHOT_SETS) / len(ZEROSHOT_SETS)
    assert per_task[ZEROSHOT_GROUP]["acc,none"] == pytest.approx(mean)
