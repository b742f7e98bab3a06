"""Model cards: metadata, tables, eval results as model-index, and the Hub's metadata validation (fake Hub)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hf_compress.cards import record_eval_results, write_model_card
from hf_compress.errors import HFCompressError

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import FakeHub, use_in_process  # noqa: E402

SB_CONFIG = {
    "model_type": "shared_basis_llama",
    "architectures": ["SharedBasisLlamaForCausalLM"],
    "basis_groups": {"q_proj": [[0, 1], [2, 3]], "up_proj": [[0, 1], [2, 3]]},
    "basis_ranks": {"q_proj": [8, 6], "up_proj": [12, 10]},
    "dense_projections": ["k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
    "compression": {
        "method": "basis_sharing", "target_ratio": 0.2, "achieved_ratio": 0.2004, "params_before": 123456,
        "params_after": 98700, "total_params_before": 500000, "total_params_after": 475244,
        "calibration": {"dataset": "../shared/data/c4/calibration-00000-of-00001.parquet", "config": None,
                        "split": "train", "column": "text", "samples": 128, "seq_len": 512, "seed": 2023, "dtype": "bfloat16"},
        "source": {"model_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": None,
                   "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "options": {"whiten": True, "group_size": 2}, "hf_compress_version": "0.1.0",
        "source_file_bytes": 98_400_000, "source_dtype": "bfloat16", "source_format": "GGUF Q4_1",
        "output_file_bytes": 215_000_000, "output_dtype": "bfloat16",
    },
}
PPL = {"task_type": "text-generation", "dataset_type": "wikitext", "dataset_name": "WikiText-2 (raw, test)",
       "dataset_config": "wikitext-2-raw-v1", "dataset_split": "test", "metric_type": "perplexity",
       "metric_name": "perplexity (2048-token windows)", "metric_value": 23.5, "source": "hf-compress ppl"}
ACC = {"task_type": "text-generation", "task_name": "hfc_piqa", "dataset_type": "baber/piqa", "dataset_name": "PIQA",
       "dataset_split": "validation", "metric_type": "acc", "metric_name": "acc (lm-eval, 0-shot)", "metric_value": 0.61,
       "source": "lm-eval 0.4.13", "source_url": "https://github.com/EleutherAI/lm-evaluation-harness"}


@pytest.fixture
def folder(tmp_path) -> Path:
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(SB_CONFIG))
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = FakeHub(tmp_path / "hub").start()
    use_in_process(server, tmp_path, monkeypatch)
    yield server
    server.stop()


def _load(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def test_metadata_and_tables_of_a_basis_sharing_checkpoint(folder, hub):
    path = write_model_card(folder)
    assert path == folder / "README.md"
    card = _load(folder)
    meta = card.data.to_dict()
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0"  # inherited from the known source
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["hf-compress", "basis-sharing", "custom_code", "compressed"]
    assert "model-index" not in meta  # nothing measured yet
    body = card.text
    assert "| Target / achieved ratio | 20.00% / 20.04% |" in body
    assert "| Parameters of the compressed layers, before / after | 123,456 / 98,700 |" in body
    assert "| All parameters, before / after | 500,000 / 475,244 |" in body
    # A quantized GGUF source is named by its type, not by the dtype it is dequantized to.
    assert "| Weights on disk, source / output | 98.4 MB (GGUF Q4_1) / 215.0 MB (bfloat16) |" in body
    assert "source_format" not in body
    assert "128 samples x 512 tokens, seed 2023; forwards in bfloat16 |" in body
    assert "| q_proj | [0,1] [2,3] | 8, 6 |" in body and "| up_proj | [0,1] [2,3] | 12, 10 |" in body
    assert "model_name" not in meta
    assert "| options.whiten | true |" in body and "| options.group_size | 2 |" in body
    assert 'import hf_compress' in body and f'from_pretrained("{folder}", trust_remote_code=True)' in body
    assert "lm_eval --model hf --model_args pretrained=" in body
    # The Hub's validation (fake Hub endpoint), through both client paths.
    card.validate()
    from huggingface_hub import HfApi

    HfApi(endpoint=hub.url)._validate_yaml(str(card))


@pytest.mark.parametrize("shares, expected", [
    ({"chat_fraction": 0.25, "free_text_fraction": 0.0}, "on c4-calibration and the teacher's own 25% chat text: "),
    ({"chat_fraction": 0.25, "free_text_fraction": 0.125},
     "on c4-calibration and the teacher's own 25% chat text and 12.5% free text: "),
    ({"chat_fraction": 0.0}, "on c4-calibration: "),
    ({}, "on c4-calibration: "),  # a record from before the teacher wrote text
])
def test_healing_row_names_the_text_the_teacher_wrote(folder, shares, expected):
    config = json.loads((folder / "config.json").read_text())
    config["compression"]["healing"] = {
        "teacher": {"model_id": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "tokens": 262144, "steps": 256,
        "trainable_params": 1000, "initial_loss": 2.5, "final_loss": 1.25,
        "options": {"dataset": "c4-calibration", "loss": "kl+lm", "lr": 1e-4, "schedule": "cosine", **shares}}
    (folder / "config.json").write_text(json.dumps(config))
    body = _load(write_model_card(folder).parent).text
    row = next(line for line in body.splitlines() if line.startswith("| Healing |"))
    assert row == ("| Healing | distillation from HuggingFaceTB/SmolLM2-135M-Instruct (kl+lm loss) " + expected
                   + "262,144 tokens in 256 steps, lr 0.0001 cosine; factors, 1,000 trainable parameters |")


def test_healing_rows_name_the_block_wise_stage_and_its_mean_errors(folder):
    config = json.loads((folder / "config.json").read_text())
    config["compression"]["healing"] = {
        "teacher": {"model_id": "t"}, "tokens": 1024, "steps": 4, "trainable_params": 10, "initial_loss": 2.0,
        "final_loss": 1.0, "options": {"dataset": "c4-calibration", "loss": "kl", "lr": 1e-4, "block_lr": 2e-4},
        "blockwise": {"tokens": 512, "epochs": 2, "blocks": [
            {"layers": [0, 1], "error_before": 0.25, "error_after": 0.125},
            {"layers": [2, 3], "error_before": 0.5, "error_after": 0.25}]}}
    (folder / "config.json").write_text(json.dumps(config))
    lines = _load(write_model_card(folder).parent).text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| Healing |"))
    assert lines[at + 1] == ("| Block-wise distillation first | 2 blocks of layers, each trained to the teacher's "
                             "hidden states on 512 tokens x 2, lr 0.0002; mean relative error at the blocks' outputs "
                             "0.375 -> 0.1875 |")
    # A stage whose errors were measured on its first sequences only says so; one measured on all of them does not.
    for measured, said in ((2, " (first 2 sequences)"), (8, "")):
        config["compression"]["healing"]["blockwise"].update(sequences=8, error_sequences=measured)
        (folder / "config.json").write_text(json.dumps(config))
        lines = _load(write_model_card(folder).parent).text.splitlines()
        assert lines[at + 1].endswith(f"mean relative error at the blocks' outputs{said} 0.375 -> 0.1875 |")


def test_eval_results_become_model_index_and_are_merged(folder, hub):
    write_model_card(folder, license="mit", base_model="someone/base")
    record_eval_results(folder, [PPL, ACC])
    record_eval_results(folder, [{**PPL, "metric_value": 21.25}])  # same measurement: replaced
    record_eval_results(folder, [{**PPL, "dataset_split": "validation", "metric_value": 30.0}])  # another split: added
    stored = json.loads((folder / "eval_results.json").read_text())["results"]
    assert [(r["metric_type"], r.get("dataset_split"), r["metric_value"]) for r in stored] == [
        ("perplexity", "test", 21.25), ("acc", "validation", 0.61), ("perplexity", "validation", 30.0)]
    card = _load(folder)
    # Values given to an earlier call are kept by later re-writes.
    assert card.data.license == "mit" and card.data.base_model == "someone/base"
    got = [(r.dataset_type, r.dataset_split, r.metric_type, r.metric_value, r.source_name) for r in card.data.eval_results]
    assert got == [("wikitext", "test", "perplexity", 21.25, None), ("baber/piqa", "validation", "acc", 0.61, "lm-eval 0.4.13"),
                   ("wikitext", "validation", "perplexity", 30.0, None)]
    # lm-eval joins the WikiText-2 test group: the group then names no single task or source.
    record_eval_results(folder, [{**ACC, "task_name": "hfc_wikitext2", "dataset_type": "wikitext",
                                  "dataset_name": "WikiText-2 (raw, test)", "dataset_config": "wikitext-2-raw-v1",
                                  "dataset_split": "test", "metric_type": "word_perplexity", "metric_value": 40.0}])
    index = ModelCard.load(folder / "README.md").data.to_dict()["model-index"][0]["results"]
    wikitext_test = [g for g in index if g["dataset"]["type"] == "wikitext" and g["dataset"]["split"] == "test"]
    assert len(wikitext_test) == 1 and "source" not in wikitext_test[0] and "name" not in wikitext_test[0]["task"]
    assert [m["type"] for m in wikitext_test[0]["metrics"]] == ["perplexity", "word_perplexity"]
    piqa = [g for g in index if g["dataset"]["type"] == "baber/piqa"][0]
    assert piqa["source"] == {"name": "lm-eval 0.4.13", "url": "https://github.com/EleutherAI/lm-evaluation-harness"}
    assert "| hfc_piqa | PIQA (validation) | acc (lm-eval, 0-shot) | 0.61 | lm-eval 0.4.13 |" in card.text
    assert "| text-generation | WikiText-2 (raw, test) | perplexity (2048-token windows) | 21.25 | hf-compress ppl |" in card.text
    card.validate()


@pytest.mark.parametrize("bad, message", [
    ({k: v for k, v in PPL.items() if k != "metric_value"}, "lacks metric_value"),
    ({**PPL, "metric_value": float("nan")}, "finite number"),
    ({**PPL, "metric_value": "12"}, "finite number"),
    ({**PPL, "wall_time": 3}, "unknown key"),
])
def test_bad_eval_results_are_refused_without_writing(folder, bad, message):
    record_eval_results(folder, [PPL])
    before = (folder / "eval_results.json").read_text(), (folder / "README.md").read_text()
    with pytest.raises(HFCompressError, match=message):
        record_eval_results(folder, [ACC, bad])
    assert ((folder / "eval_results.json").read_text(), (folder / "README.md").read_text()) == before


def test_invalid_metadata_is_refused_by_the_hub(folder, hub):
    from hf_compress.hub import push_to_hub

    write_model_card(folder, license="not-a-license")
    with pytest.raises(ValueError, match="unknown value: 'not-a-license'"):
        _load(folder).validate()
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(HFCompressError, match="refused the model card's metadata"):
        push_to_hub(folder, "alice/bad-card")
    repo = hub.load_repo("alice/bad-card")
    assert list(repo["commits"][repo["branches"]["main"]]["files"]) == [".gitattributes"]  # nothing half-pushed


def test_image_classification_family(tmp_path, hub):
    folder = tmp_path / "cnn"
    folder.mkdir()
    config = {"model_type": "pruned_cnn", "architectures": ["PrunedCNNForImageClassification"],
              "compression": {"method": "class_aware_pruning", "params_before": 272474, "params_after": 90210,
                              "macs_before": 40554000, "macs_after": 15000000, "accuracy_before": 0.9123,
                              "accuracy_after": 0.9051, "iterations": [{"iteration": i} for i in range(3)],
                              "channels": {"layer1": [64, 40]}}}
    (folder / "config.json").write_text(json.dumps(config))
    write_model_card(folder, license="mit")
    card = _load(folder)
    assert card.data.pipeline_tag == "image-classification" and "class-aware-pruning" in card.data.tags
    assert card.data.base_model is None
    assert "AutoModelForImageClassification.from_pretrained(" in card.text and "lm_eval" not in card.text
    assert "| channels.layer1 | [64, 40] |" in card.text
    assert "| Parameters, before / after | 272,474 / 90,210 |" in card.text
    assert "| macs, before / after | 40,554,000 / 15,000,000 |" in card.text
    assert "| accuracy, before / after | 0.9123 / 0.9051 |" in card.text
    assert "| iterations | 3 entries (see config.json) |" in card.text
    card.validate()


def test_card_needs_a_checkpoint(tmp_path):
    with pytest.raises(HFCompressError, match="has no config.json"):
        write_model_card(tmp_path)
    assert not (tmp_path / "README.md").exists()


def test_card_written_in_a_staging_folder_names_the_final_one(tmp_path):
    staging = tmp_path / ".smollm2-bs-0.2.incomplete-k3j4"
    staging.mkdir()
    (staging / "config.json").write_text(json.dumps(SB_CONFIG))
    write_model_card(staging)
    card = ModelCard.load(staging / "README.md")
    assert card.text.count(f'from_pretrained("{tmp_path / "smollm2-bs-0.2"}"') == 3  # plugin, no plugin, tokenizer
    assert "# smollm2-bs-0.2\n" in card.text


def test_long_group_and_rank_lists_are_summarised(folder):
    from hf_compress.cards import compression_table

    config = {**SB_CONFIG, "basis_groups": {"q_proj": [[2 * i, 2 * i + 1] for i in range(15)], "o_proj": [[0], [2], [1]]},
              "basis_ranks": {"q_proj": [185] * 6 + [184] * 9, "o_proj": [5, 5, 7]}}
    table = compression_table(config)
    assert "| q_proj | 15 groups of 2 consecutive layers (0-29) | 185 x6, 184 x9 |" in table
    assert "| o_proj | [0] [2] [1] | 5 x2, 7 |" in table


@pytest.mark.parametrize("method, model_type, architecture", [
    ("basis_sharing", "shared_basis_llama", "SharedBasisLlamaForCausalLM"),
    ("class_aware_pruning", "pruned_cnn", "PrunedCNNForImageClassification"),
    ("class_exclusion_early_exit", "class_exit_resnet", "ClassExitResNetForImageClassification"),
])
def test_card_of_a_provenance_record_of_each_method(tmp_path, method, model_type, architecture):
    import dataclasses
    import hashlib

    from hf_compress.config import MethodConfig
    from hf_compress.provenance import DataRef, SourceRef, provenance

    @dataclasses.dataclass
    class DummyConfig(MethodConfig):
        ratio: float = 0.25
        classes: tuple[int, ...] = (3, 5)
        dataset: str = str(tmp_path / "secret" / "train.parquet")  # a local path: only its name may show

    data_file = tmp_path / "train.parquet"
    data_file.write_bytes(b"rows of the training split")
    digest = hashlib.sha256(b"rows of the training split").hexdigest()
    record = provenance(method, DummyConfig(), SourceRef.of("someone/base-model", "abc123"),
                        [DataRef.of("train", data_file, "train"), DataRef.of("evaluation", "cifar10", "test")],
                        {"macs_before": 40_000_000, "macs_after": 10_000_000, "accuracy_after": 0.8125})
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [architecture],
                                                    "compression": record}))
    write_model_card(folder, repo_id="alice/compressed", license="mit")
    text = (folder / "README.md").read_text()
    assert f"| Method | {method} |" in text
    assert "| options.ratio | 0.25 |" in text and "| options.classes | [3, 5] |" in text
    assert "| options.dataset | train.parquet |" in text
    assert f"| Data (train) | train.parquet, split train, sha256 {digest[:12]} |" in text
    assert "| Data (evaluation) | cifar10, split test |" in text
    assert "| Source model | someone/base-model, revision abc123 |" in text
    assert "| macs, before / after | 40,000,000 / 10,000,000 |" in text and "| accuracy_after | 0.8125 |" in text
    assert "/tmp" not in text and str(tmp_path) not in text and digest not in text
    assert ModelCard(text).data.base_model == "someone/base-model"
